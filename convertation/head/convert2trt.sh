#!/usr/bin/env bash
# Build the TensorRT plan of a classification head (binary or multilabel) from its ONNX file
# (run on the GPU that serves it: a plan is specific to the GPU model and TensorRT version).
#
#   bash convertation/head/convert2trt.sh HEAD_ONNX OUTPUT_PLAN [EMBEDDING_DIM]
#
# Input "embedding" [batch, EMBEDDING_DIM] (default 512); batch profile min/opt/max = 1/4/8,
# matching max_batch_size 8 in the heads' config.pbtxt. FP16 by default; TRT_PRECISION=fp32
# builds without it. TRTEXEC_EXTRA_ARGS is appended.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 HEAD_ONNX OUTPUT_PLAN [EMBEDDING_DIM]" >&2
  exit 2
fi
onnx="$1"
plan="$2"
embedding_dim="${3:-512}"
trtexec="${TRTEXEC:-trtexec}"

if ! command -v "$trtexec" >/dev/null 2>&1; then
  echo "trtexec not found (install TensorRT, or use NVIDIA's Triton/TensorRT container)" >&2
  exit 127
fi
[[ -f "$onnx" ]] || { echo "ONNX file not found: $onnx" >&2; exit 1; }

shape() { echo "embedding:${1}x${embedding_dim}"; }
precision=()
[[ "${TRT_PRECISION:-fp16}" == "fp16" ]] && precision=(--fp16)

# shellcheck disable=SC2086  # TRTEXEC_EXTRA_ARGS is a list of flags
"$trtexec" \
  --onnx="$onnx" \
  --saveEngine="$plan" \
  --minShapes="$(shape 1)" \
  --optShapes="$(shape 4)" \
  --maxShapes="$(shape 8)" \
  "${precision[@]}" \
  ${TRTEXEC_EXTRA_ARGS:-}
echo "wrote $plan"

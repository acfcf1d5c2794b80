#!/usr/bin/env bash
# Build the TensorRT plan of the CT-CLIP encoder from its ONNX file (run on the GPU that serves it:
# a plan is specific to the GPU model and the TensorRT version).
#
#   bash convertation/vit/convert2trt.sh ENCODER_ONNX OUTPUT_PLAN [DEPTH HEIGHT WIDTH]
#
# Input "volume" [batch, 1, D, H, W]; batch profile min/opt/max = 1/2/4, matching
# max_batch_size 4 in the encoder's config.pbtxt. D H W default to the contract's 240 480 480.
# FP16 by default; TRT_PRECISION=fp32 builds without it. TRTEXEC_EXTRA_ARGS is appended.
set -euo pipefail

if [[ $# -ne 2 && $# -ne 5 ]]; then
  echo "usage: $0 ENCODER_ONNX OUTPUT_PLAN [DEPTH HEIGHT WIDTH]" >&2
  exit 2
fi
onnx="$1"
plan="$2"
depth="${3:-240}"
height="${4:-480}"
width="${5:-480}"
trtexec="${TRTEXEC:-trtexec}"

if ! command -v "$trtexec" >/dev/null 2>&1; then
  echo "trtexec not found (install TensorRT, or use NVIDIA's Triton/TensorRT container)" >&2
  exit 127
fi
[[ -f "$onnx" ]] || { echo "ONNX file not found: $onnx" >&2; exit 1; }

shape() { echo "volume:${1}x1x${depth}x${height}x${width}"; }
precision=()
[[ "${TRT_PRECISION:-fp16}" == "fp16" ]] && precision=(--fp16)

# shellcheck disable=SC2086  # TRTEXEC_EXTRA_ARGS is a list of flags
"$trtexec" \
  --onnx="$onnx" \
  --saveEngine="$plan" \
  --minShapes="$(shape 1)" \
  --optShapes="$(shape 2)" \
  --maxShapes="$(shape 4)" \
  "${precision[@]}" \
  ${TRTEXEC_EXTRA_ARGS:-}
echo "wrote $plan"

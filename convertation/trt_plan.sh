#!/usr/bin/env bash
# Shared by convertation/vit/convert2trt.sh and convertation/head/convert2trt.sh: build one
# TensorRT plan with trtexec from an ONNX file with a dynamic batch (run it on the GPU that
# serves the plan: a plan is specific to the GPU model and the TensorRT version).
#
#   bash convertation/trt_plan.sh ONNX PLAN INPUT_NAME DIMS MIN_BATCH OPT_BATCH MAX_BATCH
#
# DIMS are the input's dimensions after the batch, joined by "x" (e.g. 1x240x480x480).
# FP16 by default; TRT_PRECISION=fp32 builds without it. TRTEXEC_EXTRA_ARGS is appended.
set -euo pipefail

if [[ $# -ne 7 ]]; then
  echo "usage: $0 ONNX PLAN INPUT_NAME DIMS MIN_BATCH OPT_BATCH MAX_BATCH" >&2
  exit 2
fi
onnx="$1" plan="$2" input_name="$3" dims="$4" min_batch="$5" opt_batch="$6" max_batch="$7"
trtexec="${TRTEXEC:-trtexec}"

if ! command -v "$trtexec" >/dev/null 2>&1; then
  echo "trtexec not found (install TensorRT, or use NVIDIA's Triton/TensorRT container)" >&2
  exit 127
fi
[[ -f "$onnx" ]] || { echo "ONNX file not found: $onnx" >&2; exit 1; }

shape() { echo "${input_name}:${1}x${dims}"; }
precision=()
[[ "${TRT_PRECISION:-fp16}" == "fp16" ]] && precision=(--fp16)

# shellcheck disable=SC2086  # TRTEXEC_EXTRA_ARGS is a list of flags
"$trtexec" \
  --onnx="$onnx" \
  --saveEngine="$plan" \
  --minShapes="$(shape "$min_batch")" \
  --optShapes="$(shape "$opt_batch")" \
  --maxShapes="$(shape "$max_batch")" \
  "${precision[@]}" \
  ${TRTEXEC_EXTRA_ARGS:-}
echo "wrote $plan"

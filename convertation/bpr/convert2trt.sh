#!/usr/bin/env bash
# Build the TensorRT plan of the body-part regression network from its ONNX file.
#
#   bash convertation/bpr/convert2trt.sh BPR_ONNX OUTPUT_PLAN
#
# Input "slices" [batch, 1, 128, 128]; batch profile min/opt/max = 1/4/32, matching
# max_batch_size 32 in body_part_regression/config.pbtxt (the chest check scores 4 slices of
# a long series by default). FP16 by default; TRT_PRECISION=fp32 builds without it.
# TRTEXEC_EXTRA_ARGS is appended.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BPR_ONNX OUTPUT_PLAN" >&2
  exit 2
fi
exec bash "$(dirname "$0")/../trt_plan.sh" "$1" "$2" slices 1x128x128 1 4 32

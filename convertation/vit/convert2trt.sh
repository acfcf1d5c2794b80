#!/usr/bin/env bash
# Build the TensorRT plan of the CT-CLIP encoder from its ONNX file.
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
dims="1x${3:-240}x${4:-480}x${5:-480}"
exec bash "$(dirname "$0")/../trt_plan.sh" "$1" "$2" volume "$dims" 1 2 4

#!/usr/bin/env bash
# Build the TensorRT plan of a classification head (binary or multilabel) from its ONNX file.
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
exec bash "$(dirname "$0")/../trt_plan.sh" "$1" "$2" embedding "${3:-512}" 1 4 8

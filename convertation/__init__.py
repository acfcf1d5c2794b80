"""Conversion of CT-CLIP and head checkpoints to ONNX / TensorRT and the Triton repository."""

import os

# See services/__init__.py: no onnxruntime telemetry from conversion either.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

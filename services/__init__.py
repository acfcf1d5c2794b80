"""The chest-CT screening services: the domain (core) and its I/O edges."""

import os

# onnxruntime >= 1.31 sends usage telemetry on Linux unless this is set before its first
# import; every service imports this package first, so set it here once.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

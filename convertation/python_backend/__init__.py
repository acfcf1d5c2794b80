"""The template ``model.py`` of the python flavour (Triton's python backend running onnxruntime)."""

from pathlib import Path

TEMPLATE_MODEL_PY = Path(__file__).with_name("model.py")

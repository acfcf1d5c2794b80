"""The template ``model.py`` of the python flavour (Triton's python backend running onnxruntime)
and the optimised-graph cache it imports from beside it."""

from pathlib import Path

TEMPLATE_MODEL_PY = Path(__file__).with_name("model.py")
# Copied beside model.py: the embedded backend's own cache module (stdlib + onnxruntime).
OPTIMISED_GRAPHS_PY = (
    Path(__file__).parents[2] / "services" / "core" / "inference" / "optimised_graphs.py"
)

"""Inference backends behind one protocol; ``create_backend`` picks one from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.core.inference.base import InferenceBackend, ModelOutputs

if TYPE_CHECKING:
    from services.core.config import Settings

__all__ = ["InferenceBackend", "ModelOutputs", "create_backend"]


def create_backend(settings: Settings) -> InferenceBackend:
    """The backend named by ``settings.inference.backend``, imported only when used."""
    inference = settings.inference
    if inference.backend == "onnxruntime":
        from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(inference.model_repository, inference)
    if inference.backend == "triton":
        from services.core.inference.triton_backend import TritonBackend

        return TritonBackend(inference)
    raise ValueError(f"unknown inference backend {inference.backend!r}")

"""The one interface every inference backend offers: a model input in, model outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.core.model_metadata import ModelMetadata


@dataclass(frozen=True)
class ModelOutputs:
    """Outputs of the screening ensemble for a batch of B volumes."""

    embedding: np.ndarray  # float32 [B, embedding_dim], L2-normalised
    pathology_probability: np.ndarray  # float32 [B]
    finding_probabilities: np.ndarray  # float32 [B, n_labels], in metadata.labels order


class InferenceBackend(Protocol):
    """Runs the CT-CLIP encoder and both heads.

    ``infer`` takes the preprocessed model input, float32 ``[B, 1, D, H, W]``
    with ``(D, H, W) == metadata.target_shape``.
    """

    name: str  # "onnxruntime" | "triton"
    metadata: ModelMetadata

    def infer(self, volume: np.ndarray) -> ModelOutputs: ...

    def close(self) -> None: ...


class TransientBackendError(RuntimeError):
    """The model server is unreachable or overloaded: retry later, the study is fine."""

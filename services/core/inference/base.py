"""The one interface every inference backend offers: a model input in, model outputs out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.core.arrays import AnyArray, Embedding, ModelInput, Probabilities
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.model_metadata import ModelMetadata


@dataclass(frozen=True)
class ModelOutputs:
    """Outputs of the screening ensemble for a batch of B volumes."""

    embedding: Embedding  # float32 [B, embedding_dim], L2-normalised
    pathology_probability: Probabilities  # float32 [B]
    finding_probabilities: Probabilities  # float32 [B, n_labels], in metadata.labels order


def checked_model_input(volume: AnyArray, metadata: ModelMetadata) -> ModelInput:
    """The model input as a contiguous float32 ``[B, 1, D, H, W]``; ValueError otherwise."""
    expected = (1, *metadata.target_shape)
    if volume.ndim != 5 or tuple(volume.shape[1:]) != expected:
        raise ValueError(
            f"model input must be [B, {', '.join(map(str, expected))}], got {volume.shape}"
        )
    return np.ascontiguousarray(volume, dtype=np.float32)


def pathology_probabilities(output: AnyArray) -> Probabilities:
    """P(pathology) per study: index 1 of a two-class softmax, or a single probability."""
    output = np.asarray(output, dtype=np.float32)
    if output.ndim == 2 and output.shape[1] in (1, 2):
        return output[:, -1]
    if output.ndim == 1:
        return output
    raise ValueError(f"unexpected binary head output shape {output.shape}")


def model_outputs(
    embedding: AnyArray,
    pathology: AnyArray,
    findings: AnyArray,
    *,
    batch: int,
    metadata: ModelMetadata,
) -> ModelOutputs:
    """ModelOutputs from the three raw outputs of a batch, checked against the metadata."""
    finding_rows = np.asarray(findings, dtype=np.float32).reshape(batch, -1)
    if finding_rows.shape[1] != len(metadata.labels):
        raise ValueError(
            f"the model returned {finding_rows.shape[1]} findings, its metadata lists "
            f"{len(metadata.labels)}"
        )
    return ModelOutputs(
        embedding=np.asarray(embedding, dtype=np.float32).reshape(batch, -1),
        pathology_probability=pathology_probabilities(pathology),
        finding_probabilities=finding_rows,
    )


class InferenceBackend(Protocol):
    """Runs the CT-CLIP encoder and both heads, and the body-part regression model if any.

    ``infer`` takes the preprocessed model input, float32 ``[B, 1, D, H, W]``
    with ``(D, H, W) == metadata.target_shape``. ``body_part_model`` is the repository's
    body-part regression network served the same way (None when the repository has none);
    the pipeline hands it to the chest check. ``computes_on_this_cpu``: the model's
    arithmetic runs on this process's CPU cores (ONNX Runtime's CPU provider). With its
    default threads, one per core, work on other threads during ``infer`` then slows the
    call by about as much as it does, so the batch leaves such work until the model has
    answered (services/batch/sr_files.py).
    """

    name: str  # "onnxruntime" | "triton"
    metadata: ModelMetadata
    body_part_model: BodyPartRegressionModel | None
    computes_on_this_cpu: bool

    def infer(self, volume: ModelInput) -> ModelOutputs: ...

    def close(self) -> None: ...

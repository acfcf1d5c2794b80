"""The metadata file of a model repository: what the pipeline needs to know about the models.

`convertation.build_repository` writes it to ``<repository>/chest_screening/metadata.json``
(Triton ignores extra files in a model folder); the pipeline reads it for the
preprocessing target, labels, severity order, thresholds and the demo flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.core.labels import FINDING_LABELS, SEVERITY_ORDER

METADATA_SCHEMA_VERSION = 1
ENSEMBLE_NAME = "chest_screening"
ENCODER_NAME = "ct_clip_encoder"
BINARY_HEAD_NAME = "binary_head"
MULTILABEL_HEAD_NAME = "multilabel_head"
BODY_PART_REGRESSION_NAME = "body_part_regression"
METADATA_RELATIVE_PATH = Path(ENSEMBLE_NAME) / "metadata.json"


class WeightFile(BaseModel):
    """One built weight file and where its numbers came from."""

    model_config = ConfigDict(extra="forbid")

    model: str  # Triton model name, e.g. "ct_clip_encoder"
    path: str  # relative to the repository root, e.g. "ct_clip_encoder/1/model.onnx"
    sha256: str
    source: str  # "demo: seeded (seed=0)" or the checkpoint path it was converted from
    source_sha256: str | None = None  # sha256 of the checkpoint, when converted from one


class BodyPartRegressionInfo(BaseModel):
    """The repository's body-part regression model (its weight file is listed in ``weights``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = BODY_PART_REGRESSION_NAME  # Triton model name
    demo: bool  # seeded weights and an invented lookup table: shown, never decides
    inference_settings: str  # bpreg's inference-settings.json, relative to the repository root
    max_batch_size: int = Field(gt=0)  # slices per request the served model takes
    source: str  # "demo: seeded (seed=0)" or the bpreg model folder it was converted from
    source_sha256: str | None = None  # sha256 of the folder's model.pt


class PrecisionParity(BaseModel):
    """The deployed encoder's embedding against FP32 on one reference volume."""

    model_config = ConfigDict(extra="forbid")

    volume: str
    cosine: float
    max_abs_diff: float


class EncoderPrecision(BaseModel):
    """The encoder's arithmetic, and for a reduced one the parity that admitted it (the
    repository builder measures it: convertation/precision.py)."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["fp32", "int8"] = "fp32"
    min_cosine: float | None = None  # the tolerance it was held to
    max_abs_diff: float | None = None
    parity: list[PrecisionParity] = Field(default_factory=list)


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = METADATA_SCHEMA_VERSION
    demo: bool
    flavour: str  # python | onnxruntime | tensorrt
    created_at: str
    # Preprocessing target (docs/ARCHITECTURE.md, Contracts). A tiny test repository keeps the
    # field of view (shape x spacing) and shrinks the shape.
    target_shape: tuple[int, int, int] = (240, 480, 480)
    target_spacing_mm: tuple[float, float, float] = (1.5, 0.75, 0.75)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    embedding_dim: int = 512
    ctvit_config: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] = Field(default_factory=lambda: list(FINDING_LABELS))
    severity_order: list[str] = Field(default_factory=lambda: list(SEVERITY_ORDER))
    pathology_threshold: float = 0.5
    finding_thresholds: dict[str, float] = Field(
        default_factory=lambda: {label: 0.5 for label in FINDING_LABELS}
    )
    # Deployed labels the multilabel head was not trained on (e.g. COVID-19 and Cancer for a
    # head trained on CT-RATE's 18 findings): exported as a constant, they have no threshold,
    # are never positive nor the most dangerous finding, and reports give no probability.
    not_assessed: list[str] = Field(default_factory=list)
    weights: list[WeightFile] = Field(default_factory=list)
    # None: no body-part regression model; the chest check uses the tags and lung_air only.
    body_part_regression: BodyPartRegressionInfo | None = None
    encoder_precision: EncoderPrecision = Field(default_factory=EncoderPrecision)

    @model_validator(mode="after")
    def _labels_consistent(self) -> ModelMetadata:
        if sorted(self.labels) != sorted(self.severity_order):
            raise ValueError("labels and severity_order must hold the same findings")
        unknown = set(self.finding_thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds for unknown findings: {sorted(unknown)}")
        if set(self.not_assessed) - set(self.labels):
            raise ValueError(f"unknown not-assessed findings: {sorted(self.not_assessed)}")
        if set(self.not_assessed) & set(self.finding_thresholds):
            raise ValueError("a finding that is not assessed cannot have a threshold")
        return self

    @property
    def model_version(self) -> str:
        """A short, stable identifier of the weights (first 12 hex of the encoder's sha256)."""
        for weight in self.weights:
            if weight.model == ENCODER_NAME:
                return ("demo-" if self.demo else "") + weight.sha256[:12]
        return "demo" if self.demo else "unknown"


def metadata_path(repository: Path) -> Path:
    return Path(repository) / METADATA_RELATIVE_PATH


def read_metadata(repository: Path) -> ModelMetadata:
    path = metadata_path(repository)
    if not path.exists():
        raise FileNotFoundError(
            f"no model metadata at {path}: build the repository with "
            "`python -m convertation.build_repository` (see README)"
        )
    return ModelMetadata.model_validate_json(path.read_text())


def write_metadata(repository: Path, metadata: ModelMetadata) -> Path:
    path = metadata_path(repository)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata.model_dump(mode="json"), indent=2) + "\n")
    return path

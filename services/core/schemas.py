"""The study report and its parts: one pydantic model for every piece of a result.

These models travel everywhere (JSON report, RabbitMQ result message, web UI), so
they carry plain types only. ``REPORT_SCHEMA_VERSION`` changes when a field does.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

REPORT_SCHEMA_VERSION = 1

# The customer's table (docs/ARCHITECTURE.md, Contracts): these seven columns, in this order, first.
REPORT_COLUMNS: tuple[str, ...] = (
    "path_to_study",
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "processing_status",
    "time_of_processing",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessingStatus(str, Enum):
    SUCCESS = "Success"
    FAILURE = "Failure"


class IntakeSummary(_Model):
    """What was found in the input before any study was looked at."""

    files_total: int = 0
    dicom_files: int = 0
    skipped_non_dicom: int = 0
    skipped_dicomdir: int = 0
    unreadable_dicom: int = 0
    nested_archives: int = 0
    problems: list[str] = Field(default_factory=list)


class SeriesDecision(_Model):
    """Why a series was (or was not) the one analysed."""

    series_uid: str
    series_number: int | None = None
    description: str = ""
    modality: str = ""
    n_images: int = 0
    selected: bool = False
    reason: str


class QualityReport(_Model):
    """Geometry and data-quality numbers of the selected series."""

    n_slices: int
    rows: int
    columns: int
    slice_spacing_mm: float
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None = None
    coverage_mm: float
    expected_slices: int
    missing_slices: int = 0
    missing_slices_percent: float = 0.0
    duplicate_positions: int = 0
    spacing_min_mm: float
    spacing_max_mm: float
    uneven_spacing: bool = False
    gantry_tilt_degrees: float = 0.0
    patient_position: str | None = None
    convolution_kernel: str | None = None
    transfer_syntax: str | None = None


class ChestCheckEvidence(_Model):
    """Both halves of the chest check and the verdict they lead to."""

    is_chest: bool
    reason: str
    metadata_verdict: bool | None = None  # None: the tags say nothing either way
    metadata_evidence: list[str] = Field(default_factory=list)
    image_verdict: bool
    image_detector: str
    image_evidence: dict[str, float | int | str] = Field(default_factory=dict)
    coverage_mm: float


class FindingResult(_Model):
    label: str
    probability: float
    threshold: float
    positive: bool


class ModelInfo(_Model):
    version: str
    demo: bool
    backend: str  # onnxruntime | triton
    flavour: str
    weights: list[dict[str, str | None]] = Field(default_factory=list)


class StudyReport(_Model):
    """Everything known about one study: the customer's row and the evidence behind it."""

    schema_version: int = REPORT_SCHEMA_VERSION
    path_to_study: str
    study_uid: str | None = None
    series_uid: str | None = None
    probability_of_pathology: float | None = None
    pathology: int | None = None
    processing_status: ProcessingStatus
    time_of_processing: float = 0.0
    most_dangerous_pathology_type: str | None = None
    failure_reason: str | None = None
    warnings: list[str] = Field(default_factory=list)
    findings: list[FindingResult] = Field(default_factory=list)
    intake: IntakeSummary | None = None
    series_decisions: list[SeriesDecision] = Field(default_factory=list)
    quality: QualityReport | None = None
    chest_check: ChestCheckEvidence | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    model: ModelInfo | None = None
    demo_weights: bool = False

    @property
    def succeeded(self) -> bool:
        return self.processing_status is ProcessingStatus.SUCCESS

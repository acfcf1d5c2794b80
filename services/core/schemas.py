"""The study report and its parts: one pydantic model for every piece of a result.

These models travel everywhere (JSON report, RabbitMQ result message, web UI), so
they carry plain types only. ``REPORT_SCHEMA_VERSION`` changes when a field does.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from services.core.quality import QualityFlag

REPORT_SCHEMA_VERSION = 5  # 2: study_date, study_description, accession_number, embedding;
# 3: identity, failure_kind; 4: quality_flags; 5: quality.flags, quality.interpolated_slices

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


class FailureKind(str, Enum):
    """Why a Failure row is one (services/core/outcome.py names the outcomes)."""

    # Out of the screening's scope: not CT, not a chest, no series that is a volume.
    NOT_ANALYSED = "not_analysed"
    # The data could not be read, or processing broke: something to look into.
    FAILED = "failed"


class IntakeSummary(_Model):
    """What was found in the input before any study was looked at."""

    files_total: int = 0
    dicom_files: int = 0
    skipped_non_dicom: int = 0
    skipped_dicomdir: int = 0
    unreadable_dicom: int = 0
    nested_archives: int = 0
    nifti_files: int = 0  # NIfTI volumes found: one study each
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
    # The classes of this series' data-quality warnings (copied to StudyReport.quality_flags).
    flags: list[QualityFlag] = Field(default_factory=list)
    # Slices of the volume (its axis 0, feet or head first as stacked) filled by
    # interpolation between acquired neighbours.
    interpolated_slices: list[int] = Field(default_factory=list)


class BodyPartEvidence(_Model):
    """What body-part regression scores say about one series (services/core/body_part)."""

    model_config = ConfigDict(frozen=True)

    summary: str  # one line for people, e.g. "CHEST (landmarks Th12..C6); lung apex not covered"
    body_part: str | None  # bpreg's tag, e.g. "CHEST", "NECK-CHEST-ABDOMEN"; None: nothing known
    body_parts_present: list[str]  # parts with enough landmarks inside, feet to head
    landmarks_covered: list[str]  # feet to head
    first_landmark: str | None  # the lowest landmark covered
    last_landmark: str | None  # the highest landmark covered
    lung_base_covered: bool | None  # None: the lookup table has no such landmark
    lung_apex_covered: bool | None
    chest_fully_covered: bool | None
    lowest_score: float | None  # of the cleaned scores (0 = start landmark, 100 = end)
    highest_score: float | None
    observed_slope_per_mm: float | None  # None with fewer than two usable slices
    expected_slope_per_mm: float
    slope_ratio: float | None  # |observed| / expected
    slope_plausible: bool | None
    reversed_order: bool | None  # scores fall from the first to the last slice
    positions_mm: list[float]
    transformed_scores: list[float]  # every scored slice
    cleaned_scores: list[float | None]  # None where dropped (blank slice, implausible tail)
    warnings: list[str]
    demo: bool  # the lookup table (and so the model) is a demo: never decide on it


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
    # Body-part regression: None when the model repository has no such model (or it is off).
    body_part_regression: BodyPartEvidence | None = None
    body_part_regression_decides: bool = False  # False with demo weights or unusable scores
    # Lines for the report's warnings: what BPR saw, coverage and slice-order findings.
    warnings: list[str] = Field(default_factory=list)


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


class PatientIdentity(_Model):
    """Who and what a study is, from its DICOM headers: shown to signed-in users whose role
    allows it, stored in the registry, carried in the result message; never in logs, metrics,
    file names or the report files (docs/ARCHITECTURE.md, Contracts: patient identity)."""

    patient_name: str | None = None  # DICOM PN as text: "Family^Given^Middle^Prefix^Suffix"
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_birth_date: str | None = None  # ISO 8601, YYYY-MM-DD
    patient_age: str | None = None  # DICOM AS, e.g. "061Y"
    patient_sex: str | None = None  # M, F, O
    study_time: str | None = None  # HH:MM:SS
    modality: str | None = None
    referring_physician_name: str | None = None


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
    # A Failure's kind; None on a Failure row counts as FAILED (rows from before it existed).
    failure_kind: FailureKind | None = None
    # What a reader recognises the study by (from the DICOM headers, when they have it).
    study_date: str | None = None  # ISO 8601, YYYY-MM-DD
    study_description: str | None = None
    accession_number: str | None = None
    warnings: list[str] = Field(default_factory=list)
    # The classes of the data-quality warnings (services/core/quality.py): chips and filters.
    quality_flags: list[QualityFlag] = Field(default_factory=list)
    findings: list[FindingResult] = Field(default_factory=list)
    intake: IntakeSummary | None = None
    series_decisions: list[SeriesDecision] = Field(default_factory=list)
    quality: QualityReport | None = None
    chest_check: ChestCheckEvidence | None = None
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    model: ModelInfo | None = None
    demo_weights: bool = False
    # The encoder's L2-normalised embedding of the model input (Success only): what
    # `python -m training embed` collects to train heads, and what lets a screened study be
    # compared with others later without running the encoder again. Not an xlsx column.
    embedding: list[float] | None = None
    # The patient and the study's own times and kind: in the result message and the registry
    # only; the report files and the xlsx leave it out (services/core/reports.py).
    identity: PatientIdentity | None = None

    @property
    def succeeded(self) -> bool:
        return self.processing_status is ProcessingStatus.SUCCESS

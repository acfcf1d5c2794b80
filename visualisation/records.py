"""One study as the FiftyOne dataset shows it: a flat record made from a JSON report or from a
row of the embeddings parquet, with ground truth from a labels CSV when there is one.

Pure functions and pydantic models; nothing here imports fiftyone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.core.schemas import ProcessingStatus, StudyReport
from training.data import volume_key  # labels match inputs as they do for training

PATHOLOGY_CALL = "PATHOLOGY"
NORMAL_CALL = "NORMAL"

Origin = Literal["report", "embeddings"]


class StudyRecord(BaseModel):
    """Everything one sample holds, before it is a sample."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str  # one sample per key: "study:<StudyInstanceUID>", else "input:<where it came from>"
    origin: Origin  # a screening report, or a row of `python -m training embed`
    name: str  # the input's file name (what a labels CSV's VolumeName names)
    source: str  # the input folder's name (reports) or the embeddings file's (parquet rows)
    path_to_study: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    status: str  # Success | Failure
    failure_reason: str | None = None
    probability_of_pathology: float | None = None
    call: str | None = None  # PATHOLOGY | NORMAL; None when the heads did not run
    finding_probabilities: dict[str, float] = Field(default_factory=dict)
    positive_findings: list[str] = Field(default_factory=list)
    most_dangerous_finding: str | None = None
    warnings: list[str] = Field(default_factory=list)
    is_chest_ct: bool | None = None  # None: the chest check did not run
    chest_check: str | None = None  # the verdict's reason in words
    model_version: str | None = None  # "demo-<12 hex>" or "<12 hex>" of the encoder weights
    demo_weights: bool | None = None
    study_date: str | None = None
    study_description: str | None = None
    time_of_processing: float | None = None
    embedding: list[float] | None = None
    axial_preview: Path | None = None
    coronal_preview: Path | None = None
    ground_truth: list[str] | None = None  # findings labelled 1; None: no label row
    ground_truth_pathology: bool | None = None  # any finding labelled 1
    label_source: str | None = None


def study_key(study_uid: str | None, where: str) -> str:
    """One sample per study: the StudyInstanceUID when known, else where the input came from
    (a Failure row of an unreadable zip has no UID)."""
    return f"study:{study_uid}" if study_uid else f"input:{where}"


def source_of(path_to_study: str, results_dir: Path) -> str:
    """The name of the folder the input was in (the batch's INPUT, e.g. one per hospital),
    else the results folder's name (the stack names an upload by its file name only)."""
    return Path(path_to_study).parent.name or Path(results_dir).name


def _call(report: StudyReport) -> str | None:
    if not report.succeeded or report.pathology is None:
        return None
    return PATHOLOGY_CALL if report.pathology else NORMAL_CALL


def record_from_report(
    report: StudyReport,
    *,
    source: str,
    axial_preview: Path | None = None,
    coronal_preview: Path | None = None,
) -> StudyRecord:
    chest = report.chest_check
    return StudyRecord(
        key=study_key(report.study_uid, report.path_to_study),
        origin="report",
        name=Path(report.path_to_study).name,
        source=source,
        path_to_study=report.path_to_study,
        study_uid=report.study_uid,
        series_uid=report.series_uid,
        status=report.processing_status.value,
        failure_reason=report.failure_reason,
        probability_of_pathology=report.probability_of_pathology,
        call=_call(report),
        finding_probabilities={f.label: f.probability for f in report.findings},
        positive_findings=[f.label for f in report.findings if f.positive],
        most_dangerous_finding=report.most_dangerous_pathology_type,
        warnings=list(report.warnings),
        is_chest_ct=None if chest is None else chest.is_chest,
        chest_check=None if chest is None else chest.reason,
        model_version=None if report.model is None else report.model.version,
        demo_weights=report.demo_weights,
        study_date=report.study_date,
        study_description=report.study_description,
        time_of_processing=report.time_of_processing,
        embedding=report.embedding,
        axial_preview=axial_preview,
        coronal_preview=coronal_preview,
    )


def record_from_embedding_row(row: Mapping[str, object], *, source: str) -> StudyRecord:
    """A row of `python -m training embed` (name, study_uid, embedding, status,
    failure_reason, and where present input_path, encoder_version, demo_weights)."""
    name = str(row["name"])
    study_uid = _text(row.get("study_uid"))
    input_path = _text(row.get("input_path")) or name
    demo = row.get("demo_weights")
    encoder = _text(row.get("encoder_version"))
    values = row.get("embedding")
    status = str(row["status"])
    succeeded = status == ProcessingStatus.SUCCESS.value
    return StudyRecord(
        key=study_key(study_uid, f"{source}/{input_path}"),
        origin="embeddings",
        name=name,
        source=source,
        path_to_study=input_path,
        study_uid=study_uid,
        status=status,
        failure_reason=_text(row.get("failure_reason")),
        # The same form as a report's model version (services/core/model_metadata.py).
        model_version=None if encoder is None else ("demo-" if demo else "") + encoder,
        demo_weights=None if demo is None else bool(demo),
        embedding=[float(value) for value in values]
        if succeeded and isinstance(values, list | tuple)
        else None,
    )


def _text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


class LabelRows(BaseModel):
    """A labels CSV (CT-RATE layout): per volume key, the findings labelled 1."""

    model_config = ConfigDict(frozen=True)

    source: str  # the CSV's file name
    label_names: list[str]
    positives: dict[str, list[str]]  # volume key -> findings labelled 1


def with_labels(record: StudyRecord, labels: LabelRows | None) -> StudyRecord:
    """The record with its ground truth, when the labels name its input."""
    if labels is None:
        return record
    positives = labels.positives.get(volume_key(record.name))
    if positives is None:
        return record
    return record.model_copy(
        update={
            "ground_truth": list(positives),
            "ground_truth_pathology": bool(positives),
            "label_source": labels.source,
        }
    )


def embedding_dimensions(records: Iterable[StudyRecord]) -> set[int]:
    return {len(record.embedding) for record in records if record.embedding}

"""What the REST API sends and receives: one pydantic model per body."""

from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.core.labels import FINDING_LABELS
from services.core.quality import QualityFlag
from services.core.schemas import StudyReport
from services.registry.records import (
    Door,
    Priority,
    Review,
    ReviewSummary,
    StudyRecord,
    StudyState,
)

API_PREFIX = "/api/v1"  # where the frontend mounts the API
MEDIA_TYPES = {
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "json": "application/json",
    "sr": "application/dicom",
    "warnings": "text/plain; charset=utf-8",
}


class FileKindName(str, Enum):
    xlsx = "xlsx"
    json = "json"
    sr = "sr"
    warnings = "warnings"


class ApiError(BaseModel):
    reason: str


class TaskAccepted(BaseModel):
    task_id: str
    status_url: str


class FileLink(BaseModel):
    kind: str
    index: int  # 1-based, per kind (one JSON report and one SR per study)
    url: str
    description: str = ""


class StudyStatus(BaseModel):
    task_id: str
    state: Literal["queued", "processing", "done", "failed"]
    progress: float  # 0..1
    stage: str | None = None  # the pipeline stage while processing
    message: str = ""
    error: str | None = None  # why a failed task failed
    reports: list[StudyReport] | None = None  # when done: one per study, as in StudyResult
    files: list[FileLink] = []


class StudyItem(BaseModel):
    """One study of the registry, as the listing gives it."""

    task_id: str
    report_index: int
    status_url: str
    door: Door
    sender: str | None
    state: StudyState
    priority: Priority
    original_filename: str
    study_instance_uid: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    received_at: datetime
    finished_at: datetime | None
    processing_status: str | None
    probability_of_pathology: float | None
    pathology: bool | None
    most_dangerous_finding: str | None
    findings: list[str]
    failure_reason: str | None
    demo_weights: bool | None
    quality_flags: list[QualityFlag] = []  # the data-quality classes (services/core/quality.py)
    review: ReviewSummary | None = None  # the latest review: who, when, agreed or not

    @classmethod
    def of(cls, record: StudyRecord, status_url: str) -> "StudyItem":
        identity = record.identity
        return cls(
            task_id=record.task_id,
            report_index=record.report_index,
            status_url=status_url,
            door=record.door,
            sender=record.sender,
            state=record.state,
            priority=record.priority,
            original_filename=record.original_filename,
            study_instance_uid=record.study_instance_uid,
            patient_id=identity.patient_id if identity else None,
            issuer_of_patient_id=identity.issuer_of_patient_id if identity else None,
            patient_name=identity.patient_name if identity else None,
            accession_number=record.accession_number,
            study_date=record.study_date,
            study_description=record.study_description,
            received_at=record.received_at,
            finished_at=record.finished_at,
            processing_status=record.processing_status,
            probability_of_pathology=record.probability_of_pathology,
            pathology=record.pathology,
            most_dangerous_finding=record.most_dangerous_finding,
            findings=record.findings,
            failure_reason=record.failure_reason,
            demo_weights=record.demo_weights,
            quality_flags=record.quality_flags,
            review=record.review,
        )


class StudyList(BaseModel):
    items: list[StudyItem]
    next: str | None  # pass as ?cursor= for the next page; null on the last


def error_responses(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given (status, description) pairs, each an ApiError."""
    return {code: {"model": ApiError, "description": text} for code, text in codes}


COMMON_ERRORS = error_responses(
    (401, "missing or wrong bearer token"),
    (404, "no such task or file"),
    (422, "invalid request"),
)


class ReviewRequest(BaseModel):
    """A radiologist's reading of one study of a task. ``agrees``: the call stands. Otherwise
    ``pathology`` is the call as the reader makes it (left out: the opposite of the model's).
    ``findings``: labels of services/core/labels.py marked present (true) or absent (false);
    a label left out was not marked."""

    model_config = ConfigDict(extra="forbid")

    report_index: int = Field(0, ge=0, le=10_000)
    agrees: bool
    pathology: bool | None = None
    findings: dict[str, bool] = Field(default_factory=dict, max_length=len(FINDING_LABELS))
    comment: str = Field("", max_length=4000)

    @field_validator("findings")
    @classmethod
    def _known_findings(cls, findings: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(findings) - set(FINDING_LABELS))
        if unknown:
            raise ValueError(f"unknown finding(s): {', '.join(unknown)}")
        return findings


class ReviewItem(BaseModel):
    """One kept review, as the registry holds it."""

    task_id: str
    report_index: int
    reviewer: str
    agrees: bool
    pathology: bool | None  # the reader's call when they disagree
    findings: dict[str, bool]
    comment: str
    reviewed_at: datetime

    @classmethod
    def of(cls, review: Review) -> "ReviewItem":
        assert review.reviewed_at is not None  # the registry sets it when it keeps a review
        return cls(**review.model_dump(exclude={"reviewed_at"}), reviewed_at=review.reviewed_at)


class ReviewList(BaseModel):
    items: list[ReviewItem]  # oldest first; the last one is the study row's

"""What the REST API sends and receives: one pydantic model per body."""

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel

from services.core.schemas import StudyReport

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


def error_responses(*codes: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given (status, description) pairs, each an ApiError."""
    return {code: {"model": ApiError, "description": text} for code, text in codes}


COMMON_ERRORS = error_responses(
    (401, "missing or wrong bearer token"),
    (404, "no such task or file"),
    (422, "invalid request"),
)

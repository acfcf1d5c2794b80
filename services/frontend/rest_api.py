"""The REST API for integrators who speak neither DICOM nor AMQP: ``/api/v1`` on the
frontend's server (a FastAPI application mounted next to the Gradio page).

    POST /api/v1/studies                       multipart ``file`` (zip, tar, NIfTI, DICOM)
                                               -> 202 {"task_id", "status_url"}
    GET  /api/v1/studies/{task_id}             state, progress; the reports when done
    GET  /api/v1/studies/{task_id}/files/{kind}?index=1   xlsx | json | sr | warnings
    GET  /api/v1/openapi.json                  this API's OpenAPI schema (docs at /api/v1/docs)

Uploads pass the web UI's checks (services/frontend/uploads.py) and queue limit, through the
same FrontendService; an upload is not compared with earlier ones (a resubmission is a new
task). With ``frontend.api_token`` set, every call but the schema needs
``Authorization: Bearer <token>``. Every error is JSON: ``{"reason": "..."}``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run
# time, and those of functions defined inside build_rest_api would stay unresolved strings.
import secrets
import shutil
import uuid
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from loguru import logger
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from services.broker.schemas import check_safe_id, utc_now
from services.broker.storage import upload_dir
from services.core.intake.collect import ArchiveKind, FileKind, archive_kind, classify_file
from services.core.intake.tar_archive import GZIP_MAGIC
from services.core.schemas import StudyReport
from services.frontend.metrics import Refusal
from services.frontend.queue_status import read_queue_status
from services.frontend.service import FrontendService
from services.frontend.sessions import SessionTask
from services.frontend.uploads import plan_uploads, safe_file_name

API_PREFIX = "/api/v1"
API_VERSION = "1"
INCOMING_DIR = Path("frontend") / "incoming-api"
COPY_CHUNK_BYTES = 1024 * 1024
HEAD_BYTES = 1024
# Multipart framing around the file: a request this much over the size limit is refused
# before it is read.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
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


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=reason, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ApiError, "description": text}
    for code, text in (
        (401, "missing or wrong bearer token"),
        (404, "no such task or file"),
        (422, "invalid request"),
    )
}


def upload_suffix(path: Path, name: str) -> str | None:
    """The suffix the upload checks go by, from the file's content: None for anything that is
    not a zip, tar, NIfTI or DICOM file."""
    with path.open("rb") as stream:
        head = stream.read(HEAD_BYTES)
    archive = archive_kind(path, head, top_level=False)
    gzipped = head[:2] == GZIP_MAGIC
    if archive is ArchiveKind.ZIP:
        return ".zip"
    if archive is ArchiveKind.TAR:
        return ".tar.gz" if gzipped else ".tar"
    kind = classify_file(path, head)
    if kind is FileKind.NIFTI:
        return ".nii.gz" if gzipped else ".nii"
    if kind is FileKind.DICOM:
        return ".dcm"
    return None


def named_upload(name: str, suffix: str) -> str:
    base = safe_file_name(name or "upload")
    return base if base.lower().endswith(suffix) else f"{base}{suffix}"


def build_rest_api(service: FrontendService) -> FastAPI:
    """The API as an application of its own: mounted at /api/v1, it serves its own schema."""
    settings = service.settings
    api = FastAPI(
        title="Chest-CT screening API",
        version=API_VERSION,
        description=__doc__,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    bearer = HTTPBearer(auto_error=False, description="frontend.api_token, when it is set")

    @api.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"reason": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in error.errors()
        )
        return JSONResponse({"reason": f"invalid request: {problems}"}, status_code=422)

    @api.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.opt(exception=error).error("REST API error")
        return JSONResponse({"reason": f"internal error ({type(error).__name__})"}, status_code=500)

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        token = settings.frontend.api_token
        if not token:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise _error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})

    def size_limit(request: Request) -> None:
        limit = settings.frontend.max_upload_mb * 1024 * 1024
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
            raise _error(413, f"the upload is over the {settings.frontend.max_upload_mb} MB limit")

    def task_exists(task_id: str) -> str:
        try:
            check_safe_id(task_id)
        except ValueError:
            raise _error(404, "no such task") from None
        stored = service.result(task_id) is not None
        if not stored and not upload_dir(service.storage_root, task_id).exists():
            raise _error(404, "no such task")
        return task_id

    @api.post(
        "/studies",
        status_code=202,
        response_model=TaskAccepted,
        dependencies=[Depends(authorized), Depends(size_limit)],
        responses={
            **ERROR_RESPONSES,
            413: {"model": ApiError, "description": "over the upload or unpacked size limit"},
            415: {"model": ApiError, "description": "not a zip, tar, NIfTI or DICOM file"},
            429: {"model": ApiError, "description": "the processing queue is full"},
            503: {"model": ApiError, "description": "the processing queue is unreachable"},
        },
    )
    def submit_study(
        file: Annotated[UploadFile, File(description="a zip, tar(.gz), NIfTI or DICOM file")],
    ) -> JSONResponse:
        folder = service.storage_root / INCOMING_DIR / uuid.uuid4().hex
        try:
            path = _receive(file, folder)
            task_id = _queue(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # what was queued was moved away
        status_url = f"{API_PREFIX}/studies/{task_id}"
        return JSONResponse(
            TaskAccepted(task_id=task_id, status_url=status_url).model_dump(),
            status_code=202,
            headers={"Location": status_url},
        )

    def _receive(file: UploadFile, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        received = folder / "received"
        limit = settings.frontend.max_upload_mb * 1024 * 1024
        size = 0
        with received.open("wb") as target:
            while chunk := file.file.read(COPY_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    service.metrics.refusal(Refusal.TOO_LARGE)
                    raise _error(
                        413, f"the upload is over the {settings.frontend.max_upload_mb} MB limit"
                    )
                target.write(chunk)
        suffix = upload_suffix(received, file.filename or "")
        if suffix is None:
            raise _error(415, "the file is not a zip, tar, NIfTI or DICOM file")
        path = folder / named_upload(file.filename or "upload", suffix)
        received.rename(path)
        return path

    def _queue(path: Path) -> str:
        plan = plan_uploads([path], settings)
        if plan.refused:
            for reason in plan.refusals:
                service.metrics.refusal(reason)
            raise _error(413, plan.refused[0])
        try:
            waiting = read_queue_status(settings.rabbitmq).waiting
        except Exception:  # noqa: BLE001 - an unreachable broker refuses, it does not crash
            raise _error(503, "the processing queue is unreachable; try again later") from None
        limit = settings.rabbitmq.max_queue_depth
        if waiting + 1 > limit:
            service.metrics.refusal(Refusal.QUEUE_FULL)
            raise _error(
                429, f"the processing queue is full ({waiting} studies waiting, limit {limit})"
            )
        outcome = service.queue_upload(path)
        if not outcome.submitted:
            raise _error(503, " ".join(outcome.refused) or "the study could not be queued")
        return outcome.submitted[0].task_id

    @api.get(
        "/studies/{task_id}",
        response_model=StudyStatus,
        dependencies=[Depends(authorized)],
        responses=ERROR_RESPONSES,
    )
    def study_status(task_id: Annotated[str, Depends(task_exists)]) -> StudyStatus:
        view = service.task_view(
            SessionTask(task_id=task_id, original_filename="", submitted_at=utc_now())
        )
        result = view.result
        files: list[FileLink] = []
        if result is not None:
            counts: dict[str, int] = {}
            for item in result.files:
                if item.kind not in MEDIA_TYPES:
                    continue
                counts[item.kind] = counts.get(item.kind, 0) + 1
                files.append(
                    FileLink(
                        kind=item.kind,
                        index=counts[item.kind],
                        url=f"{API_PREFIX}/studies/{task_id}/files/{item.kind}"
                        f"?index={counts[item.kind]}",
                        description=item.description,
                    )
                )
        return StudyStatus(
            task_id=task_id,
            state=view.state.value,
            progress=view.fraction,
            stage=view.stage or None,
            message=view.message,
            error=result.error if result is not None else None,
            reports=result.reports if result is not None else None,
            files=files,
        )

    @api.get(
        "/studies/{task_id}/files/{kind}",
        response_class=FileResponse,
        dependencies=[Depends(authorized)],
        responses={
            **ERROR_RESPONSES,
            200: {"content": {media: {} for media in MEDIA_TYPES.values()}},
        },
    )
    def study_file(
        task_id: Annotated[str, Depends(task_exists)],
        kind: FileKindName,
        index: Annotated[int, Query(ge=1, le=10_000, description="1-based, per kind")] = 1,
    ) -> FileResponse:
        result = service.result(task_id)
        if result is None:
            raise _error(404, "the task has no result yet")
        items = result.files_of_kind(kind.value)
        if index > len(items):
            raise _error(404, f"the task has {len(items)} {kind.value} file(s)")
        path = service.file_path(items[index - 1].path)
        if path is None:
            raise _error(404, "the file is gone from the storage")
        return FileResponse(path, media_type=MEDIA_TYPES[kind.value], filename=path.name)

    return api

"""``/studies``: submit a study, follow it, fetch its files."""

import shutil
import uuid
from datetime import date
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from services.broker.schemas import Priority, StudyResult
from services.core.access import Permission, Principal
from services.core.intake.collect import ArchiveKind, FileKind, archive_kind, classify_file
from services.core.intake.tar_archive import GZIP_MAGIC
from services.core.quality import QualityFlag
from services.core.schemas import StudyReport
from services.frontend.api.dependencies import (
    Call,
    FileRecords,
    TaskRecords,
    may_delete,
    may_review,
    may_upload,
)
from services.frontend.api.errors import api_error
from services.frontend.api.models import (
    API_PREFIX,
    COMMON_ERRORS,
    MEDIA_TYPES,
    FileKindName,
    FileLink,
    ReviewItem,
    ReviewList,
    ReviewRequest,
    StudyItem,
    StudyList,
    StudyStatus,
    TaskAccepted,
    error_responses,
)
from services.frontend.metrics import Refusal
from services.frontend.queue_status import read_queue_status
from services.frontend.reviews import record_review, reviews_of
from services.frontend.service import FrontendService
from services.frontend.study_access import StudyRefused, shown, visible
from services.frontend.uploads import (
    plan_uploads,
    safe_file_name,
    upload_audit_detail,
)
from services.frontend.views import failure_reason, progress_text, queue_text, waits_in_line
from services.registry import Door, StudyFilter, StudyState
from services.registry.audit import AuditAction
from services.registry.reads import BadCursor
from services.registry.retention import delete_task

STUDIES_PATH = f"{API_PREFIX}/studies"
INCOMING_DIR = Path("frontend") / "incoming-api"
COPY_CHUNK_BYTES = 1024 * 1024
HEAD_BYTES = 1024

router = APIRouter(prefix="/studies")


def upload_suffix(path: Path) -> str | None:
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


def receive_upload(service: FrontendService, file: UploadFile, folder: Path) -> Path:
    """The upload on disk under its checked name; 413 past the limit, 415 for other files."""
    folder.mkdir(parents=True, exist_ok=True)
    received = folder / "received"
    limit_mb = service.settings.frontend.max_upload_mb
    size = 0
    with received.open("wb") as target:
        while chunk := file.file.read(COPY_CHUNK_BYTES):
            size += len(chunk)
            if size > limit_mb * 1024 * 1024:
                service.metrics.refusal(Refusal.TOO_LARGE)
                raise api_error(413, f"the upload is over the {limit_mb} MB limit")
            target.write(chunk)
    suffix = upload_suffix(received)
    if suffix is None:
        raise api_error(415, "the file is not a zip, tar, NIfTI or DICOM file")
    path = folder / named_upload(file.filename or "upload", suffix)
    received.rename(path)
    return path


def queue_upload(
    service: FrontendService, path: Path, sender: str, priority: Priority = Priority.ROUTINE
) -> str:
    """The task id of the queued upload; 413, 429 or 503 when it cannot be queued."""
    settings = service.settings
    plan = plan_uploads([path], settings)
    if plan.refused:
        for reason in plan.refusals:
            service.metrics.refusal(reason)
        raise api_error(413, plan.refused[0])
    try:
        waiting = read_queue_status(settings.rabbitmq).waiting
    except Exception:  # noqa: BLE001 - an unreachable broker refuses, it does not crash
        raise api_error(503, "the processing queue is unreachable; try again later") from None
    limit = settings.rabbitmq.max_queue_depth
    if waiting + 1 > limit:
        service.metrics.refusal(Refusal.QUEUE_FULL)
        raise api_error(
            429, f"the processing queue is full ({waiting} studies waiting, limit {limit})"
        )
    outcome = service.queue_upload(path, door=Door.REST, sender=sender, priority=priority)
    if not outcome.submitted:
        raise api_error(503, " ".join(outcome.refused) or "the study could not be queued")
    return outcome.submitted[0].task_id


def file_links(task_id: str, result: StudyResult) -> list[FileLink]:
    """A link per served file of the result, numbered per kind from 1."""
    links: list[FileLink] = []
    counts: dict[str, int] = {}
    for item in result.files:
        if item.kind not in MEDIA_TYPES:
            continue
        counts[item.kind] = index = counts.get(item.kind, 0) + 1
        url = f"{STUDIES_PATH}/{task_id}/files/{item.kind}?index={index}"
        links.append(FileLink(kind=item.kind, index=index, url=url, description=item.description))
    return links


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    dependencies=[Depends(may_upload)],
    responses=COMMON_ERRORS
    | error_responses(
        (413, "over the upload or unpacked size limit"),
        (415, "not a zip, tar, NIfTI or DICOM file"),
        (429, "the processing queue is full"),
        (503, "the processing queue is unreachable"),
    ),
)
def submit_study(
    call: Call,
    file: Annotated[UploadFile, File(description="a zip, tar(.gz), NIfTI or DICOM file")],
    priority: Annotated[
        Priority,
        Form(description="routine, urgent or stat: more urgent studies are screened first"),
    ] = Priority.ROUTINE,
) -> JSONResponse:
    folder = call.service.storage_root / INCOMING_DIR / uuid.uuid4().hex
    try:
        received = receive_upload(call.service, file, folder)
        size = received.stat().st_size
        task_id = queue_upload(call.service, received, call.principal.name, priority)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # what was queued was moved away
    call.audit(
        AuditAction.UPLOAD,
        task_id=task_id,
        detail=upload_audit_detail("rest", priority.value, size),
    )
    status_url = f"{STUDIES_PATH}/{task_id}"
    return JSONResponse(
        TaskAccepted(task_id=task_id, status_url=status_url).model_dump(),
        status_code=202,
        headers={"Location": status_url},
    )


@router.get("", response_model=StudyList, responses=COMMON_ERRORS)
def list_studies(
    call: Call,
    state: Annotated[list[StudyState] | None, Query(description="any of these states")] = None,
    door: Annotated[list[Door] | None, Query(description="any of these doors")] = None,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    issuer_of_patient_id: Annotated[str | None, Query(max_length=64)] = None,
    accession_number: Annotated[str | None, Query(max_length=64)] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    received_from: Annotated[date | None, Query(description="YYYY-MM-DD, inclusive")] = None,
    received_to: Annotated[date | None, Query(description="YYYY-MM-DD, inclusive")] = None,
    q: Annotated[str | None, Query(max_length=200, description="free text")] = None,
    reviewed: Annotated[bool | None, Query(description="false: not reviewed yet")] = None,
    quality_flag: Annotated[
        list[QualityFlag] | None, Query(description="any of these data-quality flags")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> StudyList:
    """Every study the caller may see (a technologist: the ones they sent), newest first, a
    page at a time; identity only for a role allowed to see it."""
    wanted = StudyFilter(
        states=state,
        doors=door,
        patient_id=patient_id,
        issuer_of_patient_id=issuer_of_patient_id,
        accession_number=accession_number,
        study_instance_uid=study_instance_uid,
        received_from=received_from,
        received_to=received_to,
        text=q,
        reviewed=reviewed,
        quality_flags=quality_flag,
    )
    try:
        page = call.service.registry.list_studies(
            visible(wanted, call.principal), limit=limit, cursor=cursor
        )
    except BadCursor as error:
        raise api_error(422, f"invalid request: cursor: {error}") from None
    call.audit(AuditAction.LIST, detail=f"rest, {len(page.items)} rows")
    return StudyList(
        items=[
            StudyItem.of(shown(record, call.principal), f"{STUDIES_PATH}/{record.task_id}")
            for record in page.items
        ],
        next=page.next,
    )


@router.get("/{task_id}", response_model=StudyStatus, responses=COMMON_ERRORS)
def study_status(
    call: Call,
    task_id: str,
    records: TaskRecords,
) -> StudyStatus:
    first = records[0]
    service = call.service
    call.audit(
        AuditAction.VIEW_STUDY,
        task_id=task_id,
        study_instance_uid=first.study_instance_uid,
    )
    result = service.result(task_id) if first.state.final else None
    if waits_in_line(first):
        message = queue_text(service.queue_places().get(task_id))
    elif first.state is StudyState.PROCESSING:
        message = progress_text(first)
    elif result is not None:
        message = f"{len(result.reports)} report(s) in {result.seconds:.1f} s"
    else:
        message = ""
    return StudyStatus(
        task_id=task_id,
        state=first.state.value,
        progress=first.progress,
        stage=first.stage,
        message=message,
        error=(result.error if result is not None else None)
        or (failure_reason(first) if first.state is StudyState.FAILED else None),
        reports=reports_shown(result.reports, call.principal) if result is not None else None,
        files=file_links(task_id, result) if result is not None else [],
    )


@router.get(
    "/{task_id}/files/{kind}",
    response_class=FileResponse,
    responses=COMMON_ERRORS | {200: {"content": {media: {} for media in MEDIA_TYPES.values()}}},
)
def study_file(
    call: Call,
    task_id: str,
    records: FileRecords,
    kind: FileKindName,
    index: Annotated[int, Query(ge=1, le=10_000, description="1-based, per kind")] = 1,
) -> FileResponse:
    service = call.service
    result = service.result(task_id)
    if result is None:
        raise api_error(404, "the task has no result yet")
    items = result.files_of_kind(kind.value)
    if index > len(items):
        raise api_error(404, f"the task has {len(items)} {kind.value} file(s)")
    path = service.file_path(items[index - 1].path)
    if path is None:
        raise api_error(404, "the file is gone from the storage")
    call.audit(
        FILE_ACTIONS.get(kind.value, AuditAction.DOWNLOAD_FILE),
        task_id=task_id,
        study_instance_uid=records[0].study_instance_uid,
        detail=f"rest {kind.value} {index}",
    )
    return FileResponse(path, media_type=MEDIA_TYPES[kind.value], filename=path.name)


@router.delete(
    "/{task_id}",
    status_code=204,
    dependencies=[Depends(may_delete)],
    responses=COMMON_ERRORS | error_responses((403, "the role may not delete studies")),
)
def delete_study(
    call: Call,
    task_id: str,
    records: TaskRecords,
) -> Response:
    """Remove a finished task's files and its patient's identity for everyone (an
    administrator's correction: a wrong patient, a study sent by mistake). Its row keeps the
    times and the call, named "(deleted)"."""
    if not records[0].state.final:
        raise api_error(409, "the task is still queued or processing; delete it when it ends")
    delete_task(call.service.settings, call.service.registry, task_id)
    call.service.forget_result(task_id)
    call.audit(
        AuditAction.DELETE,
        task_id=task_id,
        study_instance_uid=records[0].study_instance_uid,
    )
    return Response(status_code=204)


@router.post(
    "/{task_id}/reviews",
    status_code=201,
    dependencies=[Depends(may_review)],
    response_model=ReviewItem,
    responses=COMMON_ERRORS
    | error_responses(
        (403, "the role may not review, or the study is not the caller's"),
        (409, "the study has no result yet"),
    ),
)
def review_study(call: Call, task_id: str, body: ReviewRequest) -> ReviewItem:
    """Mark a study reviewed: agree with its call or correct it (the call, findings marked
    present or absent), with a comment. Every review is kept; the study's row shows the
    latest. Only a role with the ``review`` permission (radiologist)."""
    try:
        return record_review(call.access, call.principal, call.client, task_id, body, door="rest")
    except StudyRefused as refusal:
        raise api_error(refusal.status, refusal.reason) from None


@router.get("/{task_id}/reviews", response_model=ReviewList, responses=COMMON_ERRORS)
def study_reviews(
    call: Call,
    task_id: str,
    report_index: Annotated[int, Query(ge=0, le=10_000)] = 0,
) -> ReviewList:
    """The study's reviews, oldest first, for anyone who may see the study."""
    try:
        items = reviews_of(call.access, call.principal, call.client, task_id, report_index)
    except StudyRefused as refusal:
        raise api_error(refusal.status, refusal.reason) from None
    call.audit(AuditAction.VIEW_STUDY, task_id=task_id, detail=f"rest reviews {report_index}")
    return ReviewList(items=items)


FILE_ACTIONS = {
    "xlsx": AuditAction.DOWNLOAD_XLSX,
    "json": AuditAction.DOWNLOAD_JSON,
    "sr": AuditAction.DOWNLOAD_SR,
}


def reports_shown(reports: list[StudyReport], principal: Principal) -> list[StudyReport]:
    """The reports without the patient's identity, unless the caller's role may see it."""
    if principal.may(Permission.SEE_IDENTITY):
        return reports
    return [
        report.model_copy(update={"identity": None, "accession_number": None}) for report in reports
    ]

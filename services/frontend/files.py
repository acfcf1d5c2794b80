"""The page's study files, each behind the same checks as the study itself: the slice viewer's
data, the previews, the per-study xlsx, warnings, JSON and SR (``/files/<task>/<path>``),
and the xlsx of one's whole worklist (``/worklist.xlsx``). Every file served is audited.

Gradio's own file route serves none of them (the page gets these URLs instead).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse

from services.broker.storage import RESULTS_DIR
from services.core.access import Permission, Principal
from services.frontend.auth.access import AccessControl
from services.frontend.auth.gate import client_address, principal_of
from services.frontend.service import FrontendService
from services.frontend.study_access import (
    StudyRefused,
    may_read_files,
    readable_task,
    viewer_name,
)
from services.registry import StudyRecord
from services.registry.audit import AuditAction

FILES_PREFIX = "files"
MEDIA_TYPES = {
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".json": "application/json",
    ".dcm": "application/dicom",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".bin": "application/octet-stream",
}
ACTIONS = {
    ".xlsx": AuditAction.DOWNLOAD_XLSX,
    ".json": AuditAction.DOWNLOAD_JSON,
    ".dcm": AuditAction.DOWNLOAD_SR,
    ".png": AuditAction.VIEW_IMAGES,
    ".bin": AuditAction.VIEW_IMAGES,
}


def file_url(relative: str) -> str | None:
    """The page's URL of a result file (``results/<task>/...`` under the storage root);
    relative, so that it works behind a proxy's path prefix."""
    parts = PurePosixPath(relative).parts
    if len(parts) < 3 or parts[0] != RESULTS_DIR:
        return None
    return f"{FILES_PREFIX}/" + quote("/".join(parts[1:]), safe="/")


def _principal(request: Request) -> Principal:
    principal = principal_of(request)
    if principal is None:  # the gate lets nobody here without one
        raise HTTPException(401, "sign in first")
    return principal


def build_files_router(service: FrontendService, access: AccessControl) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def readable(principal: Principal, task_id: str) -> list[StudyRecord]:
        try:
            return readable_task(service.registry, principal, task_id, may_read_files)
        except StudyRefused as refusal:
            if refusal.status == 403:
                access.audit(principal, AuditAction.ACCESS_REFUSED, None, task_id=task_id)
            raise HTTPException(refusal.status, refusal.reason) from None

    @router.get(f"/{FILES_PREFIX}/{{task_id}}/{{relative:path}}")
    def study_file(request: Request, task_id: str, relative: str) -> FileResponse:
        principal = _principal(request)
        records = readable(principal, task_id)
        path = service.file_path(f"{RESULTS_DIR}/{task_id}/{relative}")
        task_folder = service.storage_root.resolve() / RESULTS_DIR / task_id
        if path is None or not path.is_relative_to(task_folder):
            raise HTTPException(404, "no such file")
        action = ACTIONS.get(path.suffix, AuditAction.DOWNLOAD_FILE)
        access.audit(
            principal,
            action,
            client_address(request),
            task_id=task_id,
            study_instance_uid=records[0].study_instance_uid,
            detail=path.name,
        )
        media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        # Images show in the page; documents download under their own name.
        inline = path.suffix in (".png", ".bin", ".json") and "download" not in request.query_params
        return FileResponse(
            path,
            media_type=media,
            filename=None if inline else path.name,
            headers={"cache-control": "private, no-store", "x-content-type-options": "nosniff"},
        )

    @router.get("/worklist.xlsx")
    def worklist_xlsx(request: Request) -> FileResponse:
        """Every finished study of the caller's worklist, in the customer's table."""
        principal = _principal(request)
        if not principal.may(Permission.SEE_IDENTITY):  # the table names each patient
            raise HTTPException(403, f"the role {principal.role.value} does not read study files")
        records = service.worklist_for(principal, browser_token=request.query_params.get("b"))
        records = [record for record in records if may_read_files(principal, record)]
        path = service.xlsx_for(viewer_name(principal, request.query_params.get("b")), records)
        if path is None:
            raise HTTPException(404, "no finished study on the worklist yet")
        access.audit(
            principal,
            AuditAction.DOWNLOAD_XLSX,
            client_address(request),
            detail=f"worklist, {len(records)} rows",
        )
        stamp = path.stem.removeprefix("screening_")[:15]
        return FileResponse(
            path,
            media_type=MEDIA_TYPES[".xlsx"],
            filename=f"chest-ct-worklist-{stamp}.xlsx",
            headers={"cache-control": "private, no-store"},
        )

    return router

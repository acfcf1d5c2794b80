"""What every route depends on: the frontend service, who is asking (the gate named them:
services/frontend/auth/gate.py), the task they may see. Routes declare them; nothing reads
the app's state directly.

Sizes are limited before a route runs (services/frontend/upload_limit.py, one limit for the
page and the API).
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from services.core.access import Permission, Principal
from services.frontend.api.errors import api_error
from services.frontend.auth.access import AccessControl
from services.frontend.auth.gate import client_address, principal_of
from services.frontend.service import FrontendService
from services.frontend.study_access import (
    StudyRefused,
    may_read_files,
    may_see,
    readable_task,
)
from services.registry import StudyRecord
from services.registry.audit import AuditAction

# Documents the scheme in the schema; the gate has checked the key before any route runs.
bearer = HTTPBearer(
    auto_error=False,
    description="an API key (python -m services.registry keys add NAME --role ROLE)",
)


def frontend_service(request: Request) -> FrontendService:
    service: FrontendService = request.app.state.service
    return service


def access_control(request: Request) -> AccessControl:
    access: AccessControl = request.app.state.access
    return access


Service = Annotated[FrontendService, Depends(frontend_service)]
Access = Annotated[AccessControl, Depends(access_control)]


def caller(request: Request, _scheme: Annotated[object, Depends(bearer)]) -> Principal:
    principal = principal_of(request)
    if principal is None:  # only when the API is served without the gate: refuse
        raise api_error(401, "an API key is required", {"WWW-Authenticate": "Bearer"})
    return principal


Caller = Annotated[Principal, Depends(caller)]


@dataclass(frozen=True)
class ApiCall:
    """One call of the API: what it runs on, who makes it, from where; and its audit row."""

    service: FrontendService
    principal: Principal
    access: AccessControl
    client: str | None

    def audit(
        self,
        action: AuditAction,
        *,
        task_id: str | None = None,
        study_instance_uid: str | None = None,
        detail: str = "",
    ) -> None:
        self.access.audit(
            self.principal,
            action,
            self.client,
            task_id=task_id,
            study_instance_uid=study_instance_uid,
            detail=detail,
        )


def api_call(request: Request, service: Service, principal: Caller, access: Access) -> ApiCall:
    return ApiCall(service, principal, access, client_address(request))


Call = Annotated[ApiCall, Depends(api_call)]


def may_upload(principal: Caller) -> None:
    if not principal.may(Permission.UPLOAD):
        raise api_error(403, f"the role {principal.role.value} does not send studies")


def may_review(call: Call, task_id: str) -> None:
    """By role, before the body is read: a role that does not review is refused (audited)."""
    if not call.principal.may(Permission.REVIEW):
        call.audit(AuditAction.ACCESS_REFUSED, task_id=task_id)
        raise api_error(403, f"the role {call.principal.role.value} does not review studies")


def may_delete(call: Call, task_id: str) -> None:
    if not call.principal.may(Permission.DELETE):
        call.audit(AuditAction.ACCESS_REFUSED, task_id=task_id)
        raise api_error(403, f"the role {call.principal.role.value} does not delete studies")


def task_records(task_id: str, call: Call) -> list[StudyRecord]:
    """The task's studies, if the caller may see them: 404 when there is no such task, 403
    when it is not theirs (audited)."""
    try:
        return readable_task(call.service.registry, call.principal, task_id, may_see)
    except StudyRefused as refusal:
        if refusal.status == 403:
            call.audit(AuditAction.ACCESS_REFUSED, task_id=task_id)
        raise api_error(refusal.status, refusal.reason) from None


TaskRecords = Annotated[list[StudyRecord], Depends(task_records)]


def file_records(records: TaskRecords, principal: Caller) -> list[StudyRecord]:
    if not any(may_read_files(principal, record) for record in records):
        raise api_error(403, f"the role {principal.role.value} does not read study files")
    return records


FileRecords = Annotated[list[StudyRecord], Depends(file_records)]

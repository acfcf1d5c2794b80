"""What every route depends on: the frontend service, the caller's right to ask, the size of
an upload and the task it names. Routes declare them; nothing reads the app's state directly.
"""

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.broker.schemas import check_safe_id
from services.frontend.api.errors import api_error
from services.frontend.service import FrontendService

# Multipart framing around the file: a request this much over the size limit is refused
# before it is read.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
bearer = HTTPBearer(auto_error=False, description="frontend.api_token, when it is set")


def frontend_service(request: Request) -> FrontendService:
    service: FrontendService = request.app.state.service
    return service


Service = Annotated[FrontendService, Depends(frontend_service)]


def authorized(
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = service.settings.frontend.api_token
    if not token:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise api_error(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})


def upload_size_limit(request: Request, service: Service) -> None:
    limit_mb = service.settings.frontend.max_upload_mb
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_mb * 1024 * 1024 + MULTIPART_OVERHEAD_BYTES:
        raise api_error(413, f"the upload is over the {limit_mb} MB limit")


def existing_task(task_id: str, service: Service) -> str:
    try:
        check_safe_id(task_id)
    except ValueError:
        raise api_error(404, "no such task") from None
    if service.registry.study(task_id) is None:
        raise api_error(404, "no such task")
    return task_id


TaskId = Annotated[str, Depends(existing_task)]

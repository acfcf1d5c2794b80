"""The REST API as an application of its own: mounted at /api/v1, it serves its own schema."""

from fastapi import FastAPI

from services.frontend.api import studies
from services.frontend.api.errors import install_error_handlers
from services.frontend.api.models import API_PREFIX

__all__ = ["API_PREFIX", "build_rest_api"]
from services.frontend.auth.access import AccessControl
from services.frontend.service import FrontendService

API_VERSION = "1"


def build_rest_api(service: FrontendService, access: AccessControl) -> FastAPI:
    from services.frontend import api as package  # its docstring is the API's description

    api = FastAPI(
        title="Chest-CT screening API",
        version=API_VERSION,
        description=package.__doc__ or "",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    api.state.service = service
    api.state.access = access
    install_error_handlers(api)
    api.include_router(studies.router)
    return api

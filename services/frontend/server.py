"""The frontend's web server: one FastAPI application with the gate in front of everything.

    /sign-in, /sign-out, /auth/oidc/*, /healthz   signing in and out (auth/pages.py)
    /files/<task>/<path>, /worklist.xlsx         study files, checked and audited (files.py)
    /admin/audit                                 the audit trail (admin.py)
    /api/v1/...                                  the REST API (api/)
    /...                                         the Gradio page (app.py), mounted last

Middleware, outermost first: the OIDC flow's signed state cookie (only with OIDC), the gate
(who is asking; auth/gate.py), the upload limit (upload_limit.py). HTTPS when
``frontend.tls_certificate`` and ``frontend.tls_key`` are set.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr
import uvicorn
from fastapi import FastAPI
from loguru import logger
from starlette.middleware.sessions import SessionMiddleware

from services.broker.storage import RESULTS_DIR
from services.core.access import PrincipalKind
from services.frontend.admin import build_admin_router
from services.frontend.api import API_PREFIX, build_rest_api
from services.frontend.app import PAGE_CSS, asset, build_app
from services.frontend.auth.access import AccessControl
from services.frontend.auth.gate import AccessGate, principal_of
from services.frontend.auth.pages import build_auth_router
from services.frontend.files import build_files_router
from services.frontend.service import FrontendService
from services.frontend.sessions import DOWNLOADS_DIR, FRONTEND_DIR, stored_secret
from services.frontend.upload_limit import UploadLimit

SERVER_START_TIMEOUT_S = 60.0
OIDC_STATE_SECONDS = 600  # the sign-in round trip through the provider


def oidc_state_secret(storage_root: Path) -> str:
    """The key that signs the OIDC flow's state cookie; shared by frontends on one storage."""
    return stored_secret(Path(storage_root) / FRONTEND_DIR / "oidc_state_secret")


def gradio_user(request: object) -> str | None:
    """Gradio's own check, behind the gate: a signed-in person (never a key) by name."""
    from starlette.requests import HTTPConnection

    principal = principal_of(request) if isinstance(request, HTTPConnection) else None
    return principal.name if principal and principal.kind is PrincipalKind.USER else None


def build_server(service: FrontendService) -> tuple[FastAPI, AccessControl]:
    settings = service.settings
    frontend = settings.frontend
    access = AccessControl(settings, service.registry)
    root = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    root.include_router(build_auth_router(access, frontend.oidc))
    root.include_router(build_files_router(service, access))
    root.include_router(build_admin_router(access))
    root.mount(API_PREFIX, build_rest_api(service, access))
    storage = settings.storage.root
    gr.mount_gradio_app(
        root,
        build_app(service, access),
        path="/",
        auth_dependency=gradio_user if frontend.sign_in else None,
        max_file_size=f"{frontend.max_upload_mb}mb",
        # Study files go through /files (checked, audited), never Gradio's file route.
        allowed_paths=[],
        blocked_paths=[
            str(storage / RESULTS_DIR),
            str(storage / "uploads"),
            str(storage / FRONTEND_DIR / DOWNLOADS_DIR),
            str(storage / "registry"),
        ],
        footer_links=[],
        css=PAGE_CSS,
        head=f"<script>{asset('csrf.js')}</script>",
    )
    root.add_middleware(
        UploadLimit,
        max_upload_mb=frontend.max_upload_mb,
        stall_timeout_s=frontend.upload_stall_timeout_s,
    )
    root.add_middleware(AccessGate, access=access)
    if frontend.oidc is not None:
        root.add_middleware(
            SessionMiddleware,
            secret_key=oidc_state_secret(storage),
            session_cookie="cts_oidc",
            max_age=OIDC_STATE_SECONDS,
            same_site="lax",  # the provider's redirect back is a cross-site navigation
            https_only=frontend.tls_certificate is not None,
        )
    return root, access


class WebServer:
    """uvicorn in a thread of its own, stopped by ``stop()``."""

    def __init__(self, app: FastAPI, service: FrontendService) -> None:
        frontend = service.settings.frontend
        tls = frontend.tls_certificate is not None
        config = uvicorn.Config(
            app,
            host=frontend.host,
            port=frontend.port,
            log_level="warning",
            access_log=False,  # URLs name tasks; the audit trail records who asked
            ssl_certfile=str(frontend.tls_certificate) if tls else None,
            ssl_keyfile=str(frontend.tls_key) if frontend.tls_key else None,
            timeout_keep_alive=30,
            h11_max_incomplete_event_size=64 * 1024,
        )
        self.server = uvicorn.Server(config)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.run, name="web-server", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the web server did not start (is the port taken?)")
            if time.monotonic() > deadline:
                raise RuntimeError("the web server did not start in time")
            time.sleep(0.05)
        logger.info("web server listening ({})", self.scheme)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

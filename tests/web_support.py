"""The frontend's real web server for the tests (services/frontend/server.py on a free port,
over a real registry and the real RabbitMQ), accounts, signed-in clients and finished studies
with their files. Not a test module."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import Page
from registry_support import task_submission

from services.broker.schemas import ResultFile, StudyResult, TaskStatus
from services.broker.storage import store_result
from services.core.access import Role
from services.core.config import Settings
from services.core.schemas import PatientIdentity, ProcessingStatus, StudyReport
from services.frontend.server import WebServer, build_server
from services.frontend.service import FrontendService
from services.registry import Door, Registry

PASSWORD = "a long enough password"
PATIENT_NAME = "Testpatient^Alice"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class WebFrontend:
    url: str
    service: FrontendService
    settings: Settings
    app: FastAPI

    @property
    def registry(self) -> Registry:
        return self.service.registry

    def add_user(self, name: str, role: Role) -> str:
        self.registry.accounts.add_user(name, role, password=PASSWORD)
        return name


def add_account(settings: Settings, name: str, role: Role) -> str:
    """A user in the registry of ``settings`` (a stack started by start.sh, say)."""
    registry = Registry.open(settings)
    try:
        registry.accounts.add_user(name, role, password=PASSWORD)
    finally:
        registry.close()
    return name


@contextmanager
def web_frontend(settings: Settings) -> Iterator[WebFrontend]:
    """The web server of one frontend, as python -m services.frontend serves it."""
    settings.frontend.port = free_port()
    service = FrontendService(settings, instance_id=f"web-{uuid.uuid4().hex[:6]}")
    app, _access = build_server(service)
    server = WebServer(app, service)
    server.start()
    scheme = "https" if settings.frontend.tls_certificate else "http"
    try:
        url = f"{scheme}://127.0.0.1:{settings.frontend.port}"
        yield WebFrontend(url, service, settings, app)
    finally:
        server.stop()
        service.stop()


@pytest.fixture(scope="module")
def module_frontend(settings: Settings) -> Iterator[WebFrontend]:
    """The web server over the test module's ``settings`` fixture, shared by the module's tests:
    a module takes it as its ``frontend`` fixture with ``frontend = module_frontend``."""
    with web_frontend(settings) as running:
        yield running


def sign_in_form_token(page_text: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page_text)
    assert found, "the sign-in page has no form token"
    return found.group(1)


def try_sign_in(client: httpx.Client, name: str, password: str) -> httpx.Response:
    form = client.get("/sign-in")
    return client.post(
        "/sign-in",
        data={
            "username": name,
            "password": password,
            "csrf_token": sign_in_form_token(form.text),
            "next": "/",
        },
    )


@contextmanager
def signed_in_client(frontend: WebFrontend, name: str) -> Iterator[httpx.Client]:
    """An HTTP client with the session and CSRF cookies of ``name``, sending the CSRF header
    as the page's script does."""
    with httpx.Client(base_url=frontend.url, timeout=30, verify=False) as client:
        answer = try_sign_in(client, name, PASSWORD)
        assert answer.status_code == 200, answer.text
        client.headers["X-CSRF-Token"] = client.cookies["cts_csrf"]
        yield client


def sign_in_page(page: Page, url: str, name: str, password: str = PASSWORD) -> None:
    """A browser signs in through the sign-in page and lands on the worklist."""
    page.goto(f"{url}/")
    page.fill("#username", name)
    page.fill("#password", password)
    page.click("#sign-in")
    page.locator("#worklist tbody").wait_for(state="attached", timeout=60_000)


def finished_study(
    frontend: WebFrontend, *, sender: str | None, door: Door = Door.UPLOAD, pathology: int = 1
) -> tuple[str, StudyResult]:
    """A screened study as an adapter leaves it: recorded, with its result files on disk (an
    SR, the JSON report, an xlsx, the viewer's data and a preview)."""
    root = frontend.settings.storage.root
    task_id = uuid.uuid4().hex
    folder = root / "results" / task_id
    files = {
        "sr": folder / "study1_sr.dcm",
        "json": folder / "report.json",
        "xlsx": folder / "screening.xlsx",
        "preview": folder / "previews" / "study1_axial_50.png",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"result file of " + task_id.encode())
    viewer = folder / "viewer"
    viewer.mkdir()
    (viewer / "study1.json").write_text('{"data_file": "study1.bin", "shape": [1, 1, 1]}')
    (viewer / "study1.bin").write_bytes(b"\x78\x9c\x03\x00\x00\x00\x00\x01")
    now = datetime.now(UTC)
    report = StudyReport(
        path_to_study=f"{task_id}.zip",
        study_uid=f"1.2.826.0.1.3680043.10.{int(uuid.uuid4().int % 10**12)}",
        series_uid="1.2.3.4",
        probability_of_pathology=0.9 if pathology else 0.1,
        pathology=pathology,
        processing_status=ProcessingStatus.SUCCESS,
        most_dangerous_pathology_type="Lung nodule" if pathology else None,
        accession_number="ACC-WEB-1",
        identity=PatientIdentity(patient_name=PATIENT_NAME, patient_id="PID-WEB-1"),
        demo_weights=True,
    )
    result = StudyResult(
        task_id=task_id,
        status=TaskStatus.COMPLETED,
        reports=[report],
        files=[
            ResultFile(kind=kind, path=path.relative_to(root).as_posix())
            for kind, path in files.items()
        ]
        + [ResultFile(kind="viewer", path=f"results/{task_id}/viewer/study1.json")],
        original_filename=f"{task_id}.zip",
        finished_at=now,
    )
    frontend.registry.record_submission(task_submission(task_id, at=now, door=door, sender=sender))
    store_result(root, result)
    frontend.registry.record_result(result)
    return task_id, result


def result_file(result: StudyResult, kind: str) -> str:
    """The page's path of a result file: relative to results/<task>/."""
    path = Path(result.files_of_kind(kind)[0].path)
    return path.relative_to(Path("results") / result.task_id).as_posix()

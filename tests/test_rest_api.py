"""The REST API's edges in process: the frontend's whole web application (the gate in front of
services/frontend/api/) over a real FrontendService, a real registry with an API key, and the
real RabbitMQ broker (uploads become tasks in a test queue).
The API end to end, with an adapter and the served schema, is in test_hospital_integration.py."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from stack_support import stack_settings, take_tasks

from services.broker.schemas import Priority, StudyTask
from services.core.access import Role
from services.core.config import Settings
from services.frontend.server import build_server
from services.frontend.service import FrontendService
from services.registry import Door, Registry, Submission

pytestmark = pytest.mark.rabbitmq

AUTH: dict[str, str] = {}  # the test's API key, made by the settings fixture


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with stack_settings(tmp_path / "storage", "rest") as settings:
        registry = Registry.open(settings)
        key = registry.accounts.add_key("ris", Role.RADIOLOGIST)
        registry.close()
        AUTH["Authorization"] = f"Bearer {key}"
        yield settings


def client_for(settings: Settings) -> TestClient:
    app, _access = build_server(FrontendService(settings, instance_id="rest-test"))
    return TestClient(app, base_url="http://testserver/api/v1")


def study_zip(fixtures_dir: Path, target: Path, count: int = 3) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted((fixtures_dir / "chest_ct_lung_dx_a0002").iterdir())[:count]:
            archive.write(path, arcname=f"study/{path.name}")
    return target


def post_study(client: TestClient, name: str, content: bytes, **form: str) -> httpx.Response:
    """POST /studies with the test's API key: ``content`` as the file ``name``, ``form`` as the
    form's other fields."""
    return client.post("/studies", headers=AUTH, files={"file": (name, content)}, data=form)


def queued_tasks(settings: Settings, priority: Priority = Priority.ROUTINE) -> list[StudyTask]:
    """The tasks waiting in the lane of ``priority`` (taken off it)."""
    return take_tasks(settings.rabbitmq, priority)


def test_an_upload_becomes_a_task_and_answers_its_status(
    settings: Settings, fixtures_dir: Path, tmp_path: Path
) -> None:
    upload = study_zip(fixtures_dir, tmp_path / "chest study.zip")
    with client_for(settings) as client:
        answer = post_study(client, "chest study.zip", upload.read_bytes())
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]
        assert answer.headers["location"] == f"/api/v1/studies/{task_id}"
        status = client.get(f"/studies/{task_id}", headers=AUTH)
        assert status.status_code == 200
        assert status.json()["state"] == "queued"
        assert status.json()["reports"] is None
        missing = client.get(f"/studies/{task_id}/files/xlsx", headers=AUTH)
        assert missing.status_code == 404
        assert "no result yet" in missing.json()["reason"]
    (task,) = queued_tasks(settings)
    assert task.task_id == task_id
    stored = task.resolve_study_path(settings.storage.root)
    assert stored.read_bytes() == upload.read_bytes()
    assert stored.name == "chest_study.zip"
    # Nothing is left behind in the API's incoming folder.
    incoming = settings.storage.root / "frontend" / "incoming-api"
    assert not incoming.exists() or not any(incoming.iterdir())


def test_a_stat_upload_travels_in_the_stat_lane(
    settings: Settings, fixtures_dir: Path, tmp_path: Path
) -> None:
    upload = study_zip(fixtures_dir, tmp_path / "emergency.zip").read_bytes()
    with client_for(settings) as client:
        answer = post_study(client, "emergency.zip", upload, priority="stat")
        assert answer.status_code == 202, answer.text
        # Recorded with the study: the registry's row (and so the wait estimate) knows it.
        listed = client.get("/studies", headers=AUTH).json()["items"]
        assert [(item["task_id"], item["priority"]) for item in listed] == [
            (answer.json()["task_id"], "stat")
        ]
        wrong = post_study(client, "emergency.zip", upload, priority="yesterday")
        assert wrong.status_code == 422
    assert queued_tasks(settings) == []  # nothing in the routine lane
    (task,) = queued_tasks(settings, Priority.STAT)
    assert task.task_id == answer.json()["task_id"]
    assert task.priority is Priority.STAT


def test_a_dicom_file_without_a_suffix_is_recognised(
    settings: Settings, fixtures_dir: Path
) -> None:
    source = sorted((fixtures_dir / "head_ct_gantry_tilt").iterdir())[0]
    with client_for(settings) as client:
        answer = post_study(client, "IM0001", source.read_bytes())
    assert answer.status_code == 202, answer.text
    (task,) = queued_tasks(settings)
    stored = task.resolve_study_path(settings.storage.root)
    assert [path.name for path in stored.iterdir()] == ["00000_IM0001.dcm"]


def test_every_refusal_is_json_with_a_reason(
    settings: Settings, fixtures_dir: Path, tmp_path: Path
) -> None:
    upload = study_zip(fixtures_dir, tmp_path / "study.zip").read_bytes()
    with client_for(settings) as client:
        cases = {
            401: client.post("/studies", files={"file": ("study.zip", upload)}),
            415: post_study(client, "a.zip", b"not a zip"),
            404: client.get("/studies/no-such-task", headers=AUTH),
            422: client.post("/studies", headers=AUTH, data={"other": "field"}),
        }
        wrong_token = client.get("/studies/x", headers={"Authorization": "Bearer wrong"})
    assert wrong_token.status_code == 401
    assert wrong_token.headers["www-authenticate"].startswith("Bearer")
    for status, answer in cases.items():
        assert answer.status_code == status, (status, answer.text)
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["reason"]
    assert queued_tasks(settings) == []


def test_the_ui_limits_apply(settings: Settings, fixtures_dir: Path, tmp_path: Path) -> None:
    upload = study_zip(fixtures_dir, tmp_path / "study.zip", count=6).read_bytes()
    assert len(upload) > 1024 * 1024
    settings.frontend.max_upload_mb = 1
    with client_for(settings) as client:
        too_large = post_study(client, "study.zip", upload)
    assert too_large.status_code == 413
    assert "1 MB limit" in too_large.json()["reason"]
    settings.frontend.max_upload_mb = 2048
    settings.rabbitmq.max_queue_depth = 0
    with client_for(settings) as client:
        full = post_study(client, "study.zip", upload)
    assert full.status_code == 429
    assert "queue is full" in full.json()["reason"]
    assert queued_tasks(settings) == []


def test_the_schema_is_served_and_says_how_to_authenticate(settings: Settings) -> None:
    with client_for(settings) as client:
        schema = client.get("/openapi.json").json()  # public: no key
    assert set(schema["paths"]) == {
        "/studies",  # GET lists, POST submits
        "/studies/{task_id}",
        "/studies/{task_id}/files/{kind}",
        "/studies/{task_id}/reviews",  # GET lists, POST records a review
    }
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    kinds = schema["paths"]["/studies/{task_id}/files/{kind}"]["get"]["parameters"]
    assert any(parameter["name"] == "kind" for parameter in kinds)


def test_the_listing_pages_and_filters_the_registry(
    settings: Settings, fixtures_dir: Path, tmp_path: Path
) -> None:
    """GET /studies: every study of the registry (this door's and the others'), newest first,
    a page at a time, narrowed by state, door, identifiers, dates and free text."""
    registry = Registry.open(settings)
    try:
        registry.record_submission(
            Submission(
                task_id="from-the-pacs",
                door=Door.DICOM,
                sender="PACS",
                original_filename="DICOM from PACS: 30 images",
                received_at=datetime(2026, 1, 5, 9, 0, tzinfo=UTC),
            )
        )
    finally:
        registry.close()
    uploads = [
        study_zip(fixtures_dir, tmp_path / f"s{index}.zip", count=index + 1) for index in range(3)
    ]
    with client_for(settings) as client:
        for upload in uploads:
            answer = post_study(client, upload.name, upload.read_bytes())
            assert answer.status_code == 202, answer.text
        first = client.get("/studies", headers=AUTH, params={"limit": 2}).json()
        second = client.get(
            "/studies", headers=AUTH, params={"limit": 2, "cursor": first["next"]}
        ).json()
        dicom = client.get("/studies", headers=AUTH, params={"door": "dicom"}).json()
        named = client.get("/studies", headers=AUTH, params={"q": "s1.zip"}).json()
        day = client.get(
            "/studies",
            headers=AUTH,
            params={"received_from": "2026-01-05", "received_to": "2026-01-05"},
        ).json()
        queued = client.get("/studies", headers=AUTH, params={"state": ["queued"]}).json()
        bad_cursor = client.get("/studies", headers=AUTH, params={"cursor": "garbage"})
        anonymous = client.get("/studies")
    names = [item["original_filename"] for item in first["items"] + second["items"]]
    assert names == ["s2.zip", "s1.zip", "s0.zip", "DICOM from PACS: 30 images"]
    assert second["next"] is None
    item = first["items"][0]
    for field in (
        "task_id",
        "door",
        "state",
        "priority",
        "study_instance_uid",
        "patient_id",
        "patient_name",
        "accession_number",
        "received_at",
        "finished_at",
        "processing_status",
        "probability_of_pathology",
    ):
        assert field in item
    assert (item["door"], item["state"], item["priority"]) == ("rest", "queued", "routine")
    assert [entry["task_id"] for entry in dicom["items"]] == ["from-the-pacs"]
    assert [entry["original_filename"] for entry in named["items"]] == ["s1.zip"]
    assert [entry["task_id"] for entry in day["items"]] == ["from-the-pacs"]
    assert len(queued["items"]) == 4
    assert bad_cursor.status_code == 422
    assert "cursor" in bad_cursor.json()["reason"]
    assert anonymous.status_code == 401

"""Reviews through the real web server (services/frontend/server.py on a free port over a real
registry and RabbitMQ): POST and GET /api/v1/studies/{task_id}/reviews with a session and
with an API key, refused by role, for unknown and unfinished studies; each review audited
without its comment; the page's function (services/frontend/reviews.py) with the same checks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from registry_support import task_submission
from stack_support import stack_settings
from web_support import PATIENT_NAME, WebFrontend, finished_study, module_frontend, signed_in_client

from services.core.access import Principal, PrincipalKind, Role
from services.core.config import Settings
from services.frontend.api.models import ReviewRequest
from services.frontend.auth.access import AccessControl
from services.frontend.reviews import record_review, reviews_of
from services.frontend.study_access import StudyRefused
from services.registry import Door
from services.registry.audit import AuditAction, AuditQuery

pytestmark = pytest.mark.rabbitmq

SECRET_COMMENT = "Testpatient Alice: the nodule is a vessel"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with stack_settings(tmp_path_factory.mktemp("reviews") / "storage", "reviews") as settings:
        settings.frontend.failed_sign_in_delay_s = 0.01
        yield settings


frontend = module_frontend


@pytest.fixture(scope="module")
def people(frontend: WebFrontend) -> dict[str, str]:
    """A user of each role, keyed by the role."""
    names = {
        Role.RADIOLOGIST: "rad-review",
        Role.TECHNOLOGIST: "tech-review",
        Role.ADMIN: "admin-review",
    }
    return {role.value: frontend.add_user(name, role) for role, name in names.items()}


def queued_study(frontend: WebFrontend, sender: str) -> str:
    task_id = uuid.uuid4().hex
    submission = task_submission(task_id, at=datetime.now(UTC), door=Door.UPLOAD, sender=sender)
    frontend.registry.record_submission(submission)
    return task_id


def test_a_radiologist_reviews_a_study_and_the_list_shows_it(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    task_id, result = finished_study(frontend, sender=people["technologist"], pathology=1)
    reviews = f"/api/v1/studies/{task_id}/reviews"
    with signed_in_client(frontend, people["radiologist"]) as client:
        unreviewed = client.get("/api/v1/studies", params={"reviewed": "false"}).json()
        assert task_id in {item["task_id"] for item in unreviewed["items"]}
        answer = client.post(
            reviews,
            json={
                "agrees": False,
                "findings": {"Lung nodule": False, "Emphysema": True},
                "comment": SECRET_COMMENT,
            },
        )
        assert answer.status_code == 201, answer.text
        kept = answer.json()
        assert (kept["reviewer"], kept["agrees"], kept["pathology"]) == ("rad-review", False, False)
        assert kept["findings"] == {"Lung nodule": False, "Emphysema": True}
        again = client.post(reviews, json={"agrees": True, "comment": "on second look, yes"})
        assert again.status_code == 201, again.text
        listed = client.get(reviews).json()["items"]
        assert [(item["agrees"], item["pathology"]) for item in listed] == [
            (False, False),
            (True, None),
        ]
        unreviewed = client.get("/api/v1/studies", params={"reviewed": "false"}).json()
        assert task_id not in {item["task_id"] for item in unreviewed["items"]}
        reviewed = client.get("/api/v1/studies", params={"reviewed": "true"}).json()["items"]
        row = next(item for item in reviewed if item["task_id"] == task_id)
        assert row["review"]["reviewer"] == "rad-review"
        assert row["review"]["agrees"] is True
    rows = frontend.registry.audit.events(
        AuditQuery(task_id=task_id, actions=(AuditAction.REVIEW,))
    )
    assert [row.actor for row in rows] == ["rad-review", "rad-review"]
    assert rows[0].detail.startswith("rest study 0: disagrees, pathology=0 (call 1)")
    assert rows[0].study_instance_uid == result.reports[0].study_uid
    assert rows[0].client == "127.0.0.1"
    for row in rows:  # the comment is free text: it never reaches the trail
        assert "Testpatient" not in row.model_dump_json()
        assert PATIENT_NAME not in row.model_dump_json()


def test_an_api_key_of_a_radiologist_reviews_and_other_roles_are_refused(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    task_id, _ = finished_study(frontend, sender=people["technologist"], pathology=0)
    key = frontend.registry.accounts.add_key(f"pacs-{uuid.uuid4().hex[:6]}", Role.RADIOLOGIST)
    path = f"/api/v1/studies/{task_id}/reviews"
    with httpx.Client(base_url=frontend.url, timeout=30) as client:
        bearer = {"authorization": f"Bearer {key}"}
        answer = client.post(path, headers=bearer, json={"agrees": False})
        assert answer.status_code == 201, answer.text
        assert answer.json()["pathology"] is True  # the opposite of a NORMAL call
    for who in ("technologist", "admin"):  # the technologist sent it, the admin sees all
        with signed_in_client(frontend, people[who]) as client:
            refused = client.post(path, json={"agrees": True})
            assert refused.status_code == 403, refused.text
            assert "does not review" in refused.json()["reason"]
    with signed_in_client(frontend, people["technologist"]) as client:
        assert client.get(path).status_code == 200  # their own study's reviews
    refusals = frontend.registry.audit.events(
        AuditQuery(task_id=task_id, actions=(AuditAction.ACCESS_REFUSED,))
    )
    assert {row.actor for row in refusals} == {"tech-review", "admin-review"}
    assert len(frontend.registry.reviews(task_id)) == 1


def test_unknown_unfinished_and_invalid_reviews_are_refused(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    finished, _ = finished_study(frontend, sender="someone")
    queued = queued_study(frontend, sender="someone")
    with signed_in_client(frontend, people["radiologist"]) as client:
        expected: list[tuple[str, dict[str, Any], int, str]] = [
            (uuid.uuid4().hex, {"agrees": True}, 404, "no such study"),
            (queued, {"agrees": True}, 409, "no result yet"),
            (finished, {"agrees": True, "report_index": 3}, 404, "no study 3"),
            (finished, {"agrees": True, "pathology": False}, 422, "cannot change the call"),
            (finished, {"agrees": False, "findings": {"Dragon": True}}, 422, "Dragon"),
            (finished, {"agrees": "maybe"}, 422, "agrees"),
            (finished, {"agrees": True, "rating": 5}, 422, "rating"),
        ]
        for task_id, body, status, reason in expected:
            answer = client.post(f"/api/v1/studies/{task_id}/reviews", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert reason in answer.json()["reason"], (body, answer.text)
        assert client.get(f"/api/v1/studies/{uuid.uuid4().hex}/reviews").status_code == 404
    assert frontend.registry.reviews(finished) == []
    assert frontend.registry.reviews(queued) == []


def test_the_page_records_a_review_through_the_same_checks(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    access = AccessControl(frontend.settings, frontend.registry)
    task_id, _ = finished_study(frontend, sender=people["technologist"], pathology=1)
    radiologist = Principal(name="rad-review", role=Role.RADIOLOGIST, kind=PrincipalKind.USER)
    technologist = Principal(name="tech-review", role=Role.TECHNOLOGIST, kind=PrincipalKind.USER)
    request = ReviewRequest(agrees=True, findings={"Lung nodule": True}, comment="seen")
    kept = record_review(access, radiologist, "10.0.0.7", task_id, request)
    assert (kept.reviewer, kept.agrees, kept.findings) == (
        "rad-review",
        True,
        {"Lung nodule": True},
    )
    with pytest.raises(StudyRefused) as refused:
        record_review(access, technologist, "10.0.0.8", task_id, request)
    assert refused.value.status == 403
    assert [item.comment for item in reviews_of(access, technologist, None, task_id)] == ["seen"]
    row = frontend.registry.study(task_id)
    assert row is not None
    assert row.review is not None
    assert row.review.reviewer == "rad-review"
    audited = frontend.registry.audit.events(
        AuditQuery(task_id=task_id, actions=(AuditAction.REVIEW,))
    )
    assert [(row.client, row.detail) for row in audited] == [
        ("10.0.0.7", "page study 0: agrees (call 1), 1 finding(s) marked")
    ]

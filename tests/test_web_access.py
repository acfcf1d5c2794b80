"""Every door of the web server checks who is asking: the real server (services/frontend/
server.py) on a free port over a real registry and RabbitMQ, asked anonymously, with the
wrong role and with the right one; sessions, CSRF, lockout, upload limits and the audit
trail of each web action."""

from __future__ import annotations

import socket
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from stack_support import delete_topology
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from web_support import (
    PASSWORD,
    PATIENT_NAME,
    WebFrontend,
    finished_study,
    result_file,
    signed_in_client,
    try_sign_in,
    web_frontend,
)

from services.core.access import Principal, PrincipalKind, Role
from services.core.config import Settings, load_settings
from services.frontend.api import API_PREFIX
from services.frontend.auth.gate import PUBLIC_PATHS
from services.registry import upgrade_registry
from services.registry.audit import AuditAction, AuditQuery

pytestmark = pytest.mark.rabbitmq

LOCKOUT_AFTER = 4


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = load_settings(environ={})
    settings.storage.root = tmp_path_factory.mktemp("web") / "storage"
    settings.rabbitmq.queue_prefix = f"test-web-{uuid.uuid4().hex[:10]}"
    settings.metrics.enabled = False
    settings.frontend.max_upload_mb = 1
    settings.frontend.upload_stall_timeout_s = 2.0
    settings.frontend.failed_sign_in_delay_s = 0.01
    settings.frontend.lockout_after_failures = LOCKOUT_AFTER
    upgrade_registry(settings)
    yield settings
    delete_topology(settings.rabbitmq)


@pytest.fixture(scope="module")
def frontend(settings: Settings) -> Iterator[WebFrontend]:
    with web_frontend(settings) as running:
        yield running


@pytest.fixture(scope="module")
def people(frontend: WebFrontend) -> dict[str, str]:
    """One user of each role, and a second technologist."""
    return {
        "radiologist": frontend.add_user("rad1", Role.RADIOLOGIST),
        "technologist": frontend.add_user("tech1", Role.TECHNOLOGIST),
        "other_technologist": frontend.add_user("tech2", Role.TECHNOLOGIST),
        "admin": frontend.add_user("admin1", Role.ADMIN),
    }


@pytest.fixture(scope="module")
def study(frontend: WebFrontend, people: dict[str, str]) -> tuple[str, Any]:
    """A finished study the first technologist sent."""
    return finished_study(frontend, sender=people["technologist"])


def concrete(path: str, task_id: str, relative: str) -> str:
    """A route's path with its parameters filled in with a real study's."""
    values = {"task_id": task_id, "relative": relative, "kind": "json"}
    for name in ("task_id", "relative", "kind"):
        path = path.replace(f"{{{name}:path}}", values[name]).replace(f"{{{name}}}", values[name])
    while "{" in path:  # Gradio's own parameters (file names, component ids...)
        start, end = path.index("{"), path.index("}")
        path = path[:start] + "x" + path[end + 1 :]
    return path


def every_route(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, frozenset[str]]]:
    """(path, methods) of every route of the app and of every app mounted in it."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI >= 0.16x keeps an included router as one entry
            inner_prefix = prefix + getattr(getattr(route, "include_context", None), "prefix", "")
            yield from every_route(list(included.routes), inner_prefix)
        elif isinstance(route, Mount):
            mounted = prefix + route.path
            inner = getattr(route.app, "routes", None) or getattr(
                getattr(route.app, "router", None), "routes", None
            )
            if inner:
                yield from every_route(list(inner), mounted)
            else:  # static files: any path under the mount
                yield f"{mounted}/anything", frozenset({"GET"})
        elif isinstance(route, WebSocketRoute):
            yield prefix + route.path, frozenset({"WEBSOCKET"})
        elif isinstance(route, Route):
            yield prefix + route.path, frozenset(route.methods or {"GET"}) - {"HEAD"}


def test_only_the_sign_in_pages_and_the_health_check_are_public() -> None:
    assert {
        "/sign-in",
        "/healthz",
        "/auth/oidc/start",
        "/auth/oidc/callback",
        "/api/v1/openapi.json",
        "/api/v1/docs",
    } == PUBLIC_PATHS


def test_every_route_refuses_an_anonymous_caller(
    frontend: WebFrontend, study: tuple[str, Any]
) -> None:
    task_id, result = study
    routes = sorted(set(every_route(list(frontend.app.routes))), key=lambda pair: pair[0])
    checked = 0
    with httpx.Client(base_url=frontend.url, timeout=30) as anonymous:
        for path, methods in ((p, m) for p, m in routes):
            url = concrete(path, task_id, result_file(result, "json"))
            for method in methods:
                if method == "WEBSOCKET":
                    continue  # Gradio serves none; the gate closes them (see the gate)
                answer = anonymous.request(
                    method, url, headers={"accept": "application/json"}, content=b"{}"
                )
                if path in PUBLIC_PATHS:
                    assert answer.status_code != 401, (method, path)
                    continue
                assert answer.status_code == 401, (method, path, answer.status_code)
                assert answer.json() == {"reason": "sign in first"}
                checked += 1
        # A browser is sent to the sign-in page, with the way back.
        page = anonymous.get(f"/files/{task_id}/report.json", headers={"accept": "text/html"})
        assert page.status_code == 303
        assert page.headers["location"] == f"/sign-in?next=%2Ffiles%2F{task_id}%2Freport.json"
    assert checked > 40  # Gradio's, the REST API's, the files', the admin's routes


# Who may reach which family of routes: a signed-in person by session cookie (the page's
# routes), a system by API key (/api/v1). "technologist" sent the walk's studies, "other
# technologist" did not. A route of ours missing from ROUTE_FAMILY fails the walk: add it
# with its family, and it must answer 403 to every role its family leaves out.
EVERYONE = frozenset({"radiologist", "technologist", "other_technologist", "admin"})
MAY_REACH: dict[str, frozenset[str]] = {
    "page": EVERYONE,  # Gradio's page, assets and API: each action checks the role itself
    "signing": EVERYONE,  # sign-out, the REST API's docs
    "list": EVERYONE,  # one's worklist (the admin's without identity)
    "worklist file": EVERYONE - {"admin"},  # it holds identity
    "study": EVERYONE - {"other_technologist"},  # the admin's without identity
    "study files": frozenset({"radiologist", "technologist"}),  # identity and pixels
    "upload": EVERYONE - {"admin"},
    "review": frozenset({"radiologist"}),
    "delete": frozenset({"admin"}),
    "audit": frozenset({"admin"}),
}
ROUTES_OF_FAMILY: dict[str, list[str]] = {
    "signing": ["POST /sign-out", "GET /api/v1/docs/oauth2-redirect"],
    "list": ["GET /api/v1/studies"],
    "worklist file": ["GET /worklist.xlsx"],
    "study": ["GET /api/v1/studies/{task_id}", "GET /api/v1/studies/{task_id}/reviews"],
    "study files": [
        "GET /files/{task_id}/{relative:path}",
        "GET /api/v1/studies/{task_id}/files/{kind}",
    ],
    "upload": ["POST /api/v1/studies"],
    "review": ["POST /api/v1/studies/{task_id}/reviews"],
    "delete": ["DELETE /api/v1/studies/{task_id}"],
    "audit": ["GET /admin/audit"],
}
ROUTE_FAMILY: dict[tuple[str, str], str] = {
    (route.split(" ")[0], route.split(" ")[1]): family
    for family, routes in ROUTES_OF_FAMILY.items()
    for route in routes
}
WALK_ROLES = {
    "radiologist": Role.RADIOLOGIST,
    "technologist": Role.TECHNOLOGIST,
    "other_technologist": Role.TECHNOLOGIST,
    "admin": Role.ADMIN,
}


def gradio_routes(app: Any) -> set[tuple[str, frozenset[str]]]:
    """The routes of the Gradio app mounted in the server (its page, assets and API)."""
    mounts = [
        route
        for route in app.routes
        if isinstance(route, Mount) and isinstance(route.app, gr.routes.App)
    ]
    assert len(mounts) == 1, "the Gradio page is mounted once"
    return set(every_route(mounts))


def answer_status(client: httpx.Client, method: str, url: str) -> int:
    """The answer's status, its body unread (some of Gradio's answers are endless streams);
    the gate's own refusal of a caller it did not recognise reads as 0."""
    headers = {"accept": "application/json"}
    with client.stream(method, url, headers=headers, content=b"{}") as answer:
        if answer.status_code == 401 and answer.read() == b'{"reason": "sign in first"}':
            return 0
        return answer.status_code


def test_every_route_answers_each_role_as_the_table_says(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    page_routes = gradio_routes(frontend.app)
    ours = {
        (method, path)
        for path, methods in set(every_route(list(frontend.app.routes))) - page_routes
        for method in methods
        if path not in PUBLIC_PATHS
    }
    assert ours - set(ROUTE_FAMILY) == set(), "routes without a family in ROUTE_FAMILY"
    assert set(ROUTE_FAMILY) - ours == set(), "ROUTE_FAMILY names routes the server lacks"
    walk = sorted(
        [(path, method, "page") for path, methods in page_routes for method in methods]
        + [(path, method, family) for (method, path), family in ROUTE_FAMILY.items()]
    )
    keys = {who: f"walk-{who}-{uuid.uuid4().hex[:6]}" for who in WALK_ROLES}
    secrets = {
        who: frontend.registry.accounts.add_key(keys[who], role) for who, role in WALK_ROLES.items()
    }
    page_study = finished_study(frontend, sender=people["technologist"])
    rest_study = finished_study(frontend, sender=keys["technologist"])
    checked = 0
    with ExitStack() as stack:
        by_session = {
            who: stack.enter_context(signed_in_client(frontend, people[who])) for who in WALK_ROLES
        }
        by_key = {
            who: stack.enter_context(
                httpx.Client(
                    base_url=frontend.url,
                    timeout=30,
                    headers={"authorization": f"Bearer {secrets[who]}"},
                )
            )
            for who in WALK_ROLES
        }
        for path, method, family in walk:
            if method == "WEBSOCKET":
                continue  # Gradio serves none; the gate names the caller of one all the same
            rest = path.startswith(API_PREFIX)
            statuses: dict[str, int] = {}
            for who in WALK_ROLES:
                task_id, result = rest_study if rest else page_study
                if method == "DELETE":  # each role tries on a study of its own to lose
                    task_id, result = finished_study(frontend, sender=keys["technologist"])
                url = concrete(path, task_id, result_file(result, "json"))
                if path == "/sign-out":  # on a session of its own, kept for the walk
                    with signed_in_client(frontend, people[who]) as leaving:
                        statuses[who] = answer_status(leaving, method, url)
                    continue
                client = by_key[who] if rest else by_session[who]
                statuses[who] = answer_status(client, method, url)
            for who, status in statuses.items():
                assert status != 0, (method, path, who)  # signed in, yet not recognised
                if who not in MAY_REACH[family]:
                    assert status == 403, (method, path, who, status)
                elif family in ("page", "signing"):  # the role makes no difference here
                    assert len(set(statuses.values())) == 1, (method, path, statuses)
                else:
                    assert status != 403, (method, path, who, status)
                checked += 1
    assert checked > 4 * 90  # each of 4 callers on Gradio's, the REST API's, our routes
    # Only the studies an administrator deleted are gone; the walk's own are whole.
    assert frontend.registry.study(page_study[0]) is not None


def test_study_files_and_the_rest_api_answer_by_role(
    frontend: WebFrontend, people: dict[str, str], study: tuple[str, Any]
) -> None:
    task_id, result = study
    sr = f"/files/{task_id}/{result_file(result, 'sr')}"
    viewer = f"/files/{task_id}/viewer/study1.bin"
    rest = f"/api/v1/studies/{task_id}"
    expected = {  # who: (SR, viewer data, REST status, REST SR)
        "technologist": (200, 200, 200, 200),  # their own study
        "radiologist": (200, 200, 200, 200),
        "other_technologist": (403, 403, 403, 403),
        "admin": (403, 403, 200, 403),  # the row, not the identity or the files
    }
    for who, statuses in expected.items():
        with signed_in_client(frontend, people[who]) as client:
            got = (
                client.get(sr).status_code,
                client.get(viewer).status_code,
                client.get(rest).status_code,
                client.get(f"{rest}/files/sr").status_code,
            )
            assert got == statuses, who
            listed = client.get("/api/v1/studies").json()["items"]
            mine = [item for item in listed if item["task_id"] == task_id]
            assert len(mine) == (0 if who == "other_technologist" else 1), who
            if mine:
                shown = mine[0]["patient_name"]
                assert shown == (None if who == "admin" else PATIENT_NAME), who
            report = client.get(rest).json().get("reports") if statuses[2] == 200 else None
            if report:
                identity = report[0].get("identity")
                assert (identity is None) == (who == "admin"), who
    # Gradio's own file route never serves a study's file, even to a radiologist.
    absolute = frontend.settings.storage.root / result.files_of_kind("sr")[0].path
    with signed_in_client(frontend, people["radiologist"]) as client:
        assert client.get(f"/gradio_api/file={absolute}").status_code in (403, 404)


def test_a_study_file_downloads_under_its_task_never_the_patient(
    frontend: WebFrontend, people: dict[str, str], study: tuple[str, Any]
) -> None:
    """Every task stores output.xlsx; the header (which a browser follows over the link's
    download attribute) names the file by study date and task, without identity or
    accession number."""
    task_id, result = study
    expected = f"chest-ct_task-{task_id[:8]}_"
    with signed_in_client(frontend, people["radiologist"]) as client:
        for path in (
            f"/files/{task_id}/{result_file(result, 'xlsx')}",
            f"/files/{task_id}/{result_file(result, 'sr')}",
            f"/api/v1/studies/{task_id}/files/xlsx",
        ):
            answer = client.get(path)
            assert answer.status_code == 200, path
            disposition = answer.headers["content-disposition"]
            assert disposition.startswith("attachment;"), disposition
            assert f'filename="{expected}' in disposition, disposition
            for identity in ("Testpatient", "Alice", "PID-WEB-1", "ACC-WEB-1"):
                assert identity not in disposition, disposition
        # Images stay inline, for the page to show.
        preview = client.get(f"/files/{task_id}/{result_file(result, 'preview')}")
        assert "content-disposition" not in preview.headers


def test_the_page_lists_by_role_without_identity_for_the_administrator(
    frontend: WebFrontend, people: dict[str, str], study: tuple[str, Any]
) -> None:
    task_id, _result = study
    service = frontend.service

    def listed(name: str, role: Role) -> list[Any]:
        principal = Principal(name=name, role=role, kind=PrincipalKind.USER)
        return [r for r in service.worklist_for(principal, None) if r.task_id == task_id]

    assert listed(people["other_technologist"], Role.TECHNOLOGIST) == []
    (own,) = listed(people["technologist"], Role.TECHNOLOGIST)
    assert own.identity is not None
    assert own.identity.patient_name == PATIENT_NAME
    (seen,) = listed(people["admin"], Role.ADMIN)
    assert seen.identity is None
    assert seen.accession_number is None


def test_an_api_key_works_until_revoked(frontend: WebFrontend, study: tuple[str, Any]) -> None:
    task_id, _ = study
    name = f"ris-{uuid.uuid4().hex[:6]}"
    key = frontend.registry.accounts.add_key(name, Role.RADIOLOGIST)
    with httpx.Client(base_url=frontend.url, timeout=30) as client:
        bearer = {"authorization": f"Bearer {key}"}
        assert client.get(f"/api/v1/studies/{task_id}", headers=bearer).status_code == 200
        wrong = client.get("/api/v1/studies", headers={"authorization": "Bearer cts_wrong"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        frontend.registry.accounts.revoke_key(name)
        time.sleep(5.5)  # the gate's cache: a revoked key is out within 5 s
        assert client.get("/api/v1/studies", headers=bearer).status_code == 401


def test_a_change_needs_the_csrf_token_and_the_same_origin(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    with signed_in_client(frontend, people["radiologist"]) as client:
        token = client.headers.pop("X-CSRF-Token")
        refused = client.post("/sign-out")
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["reason"]
        foreign = client.post(
            "/sign-out", headers={"X-CSRF-Token": token, "Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        assert client.post("/sign-out", headers={"X-CSRF-Token": token}).status_code == 200
        assert client.get("/api/v1/studies").status_code == 401  # signed out


def test_cookies_are_httponly_and_strict(frontend: WebFrontend, people: dict[str, str]) -> None:
    with httpx.Client(base_url=frontend.url, timeout=30) as client:
        answer = try_sign_in(client, people["radiologist"], PASSWORD)
        cookies = {
            header.split("=", 1)[0]: header.lower()
            for header in answer.headers.get_list("set-cookie")
        }
    assert "httponly" in cookies["cts_session"]
    assert "samesite=strict" in cookies["cts_session"]
    assert "httponly" not in cookies["cts_csrf"]  # the page's script echoes it
    assert "samesite=strict" in cookies["cts_csrf"]
    assert "max-age" not in cookies["cts_session"]  # ends with the browser


def test_repeated_failures_lock_the_account_and_are_audited(frontend: WebFrontend) -> None:
    name = frontend.add_user(f"victim-{uuid.uuid4().hex[:6]}", Role.RADIOLOGIST)
    with httpx.Client(base_url=frontend.url, timeout=60) as client:
        statuses = [
            try_sign_in(client, name, f"guess number {n}").status_code for n in range(LOCKOUT_AFTER)
        ]
        assert statuses == [401] * (LOCKOUT_AFTER - 1) + [429]
        locked = try_sign_in(client, name, PASSWORD)
        assert locked.status_code == 429
        assert "locked for 15 minutes" in locked.text
    actions = [e.action for e in frontend.registry.audit.events(AuditQuery(actor=name))]
    assert (
        actions
        == [AuditAction.SIGN_IN_FAILED] * (LOCKOUT_AFTER - 1) + [AuditAction.SIGN_IN_LOCKED] * 2
    )


def raw_request(frontend: WebFrontend, head: bytes, body: bytes = b"") -> bytes:
    """What the server answers to these bytes on a fresh connection (None on silence)."""
    port = int(frontend.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def upload_head(frontend: WebFrontend, declared_length: int) -> bytes:
    """The head of a REST upload by a technologist's key, declaring this body length."""
    key = frontend.registry.accounts.add_key(f"raw-{uuid.uuid4().hex[:6]}", Role.TECHNOLOGIST)
    return (
        b"POST /api/v1/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {key}\r\n".encode()
        + b"Content-Type: multipart/form-data; boundary=x\r\n"
        + f"Content-Length: {declared_length}\r\n\r\n".encode()
    )


def test_an_upload_over_the_limit_is_refused_before_its_body(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    answer = raw_request(frontend, upload_head(frontend, 3_000_000_000))  # no byte of 3 GB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"over the 1 MB limit" in answer


def test_a_stalled_upload_is_dropped(frontend: WebFrontend) -> None:
    answer = raw_request(frontend, upload_head(frontend, 1000), b"--x\r\n")  # then nothing
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"stalled" in answer


def test_each_rest_action_writes_one_audit_row(
    frontend: WebFrontend, people: dict[str, str], fixtures_dir: Path, tmp_path: Path
) -> None:
    name = frontend.add_user(f"auditor-{uuid.uuid4().hex[:6]}", Role.RADIOLOGIST)
    task_id, result = finished_study(frontend, sender="someone")
    upload = tmp_path / "Testpatient_Alice_1950-01-01.zip"  # names are what people type
    with zipfile.ZipFile(upload, "w") as archive:  # under the test's 1 MB limit
        first = sorted((fixtures_dir / "chest_ct_lung_dx_a0002").iterdir())[0]
        archive.write(first, arcname=first.name)
    with signed_in_client(frontend, name) as client:
        assert client.get("/api/v1/studies").status_code == 200
        assert client.get(f"/api/v1/studies/{task_id}").status_code == 200
        for kind in ("json", "sr", "xlsx"):
            assert client.get(f"/api/v1/studies/{task_id}/files/{kind}").status_code == 200
        assert client.get(f"/files/{task_id}/viewer/study1.bin").status_code == 200
        sent = client.post("/api/v1/studies", files={"file": (upload.name, upload.read_bytes())})
        assert sent.status_code == 202, sent.text
        assert client.post("/sign-out").status_code == 200
    rows = frontend.registry.audit.events(AuditQuery(actor=name))
    assert [row.action for row in rows] == [
        AuditAction.SIGN_IN,
        AuditAction.LIST,
        AuditAction.VIEW_STUDY,
        AuditAction.DOWNLOAD_JSON,
        AuditAction.DOWNLOAD_SR,
        AuditAction.DOWNLOAD_XLSX,
        AuditAction.VIEW_IMAGES,
        AuditAction.UPLOAD,
        AuditAction.SIGN_OUT,
    ]
    assert {row.task_id for row in rows[2:7]} == {task_id}
    assert rows[2].study_instance_uid == result.reports[0].study_uid
    assert all(row.client == "127.0.0.1" for row in rows)
    assert all(PATIENT_NAME not in row.model_dump_json() for row in rows)
    # The upload's row: its task, door and size; never the file's name (the trail is kept).
    assert rows[7].task_id == sent.json()["task_id"]
    assert rows[7].detail == f"rest upload, routine, {upload.stat().st_size} bytes"
    assert all("Testpatient" not in row.model_dump_json() for row in rows)


def test_an_administrator_deletes_a_study_and_reads_the_trail(
    frontend: WebFrontend, people: dict[str, str]
) -> None:
    task_id, _ = finished_study(frontend, sender="someone")
    with signed_in_client(frontend, people["radiologist"]) as radiologist:
        assert radiologist.delete(f"/api/v1/studies/{task_id}").status_code == 403
        assert radiologist.get("/admin/audit").status_code == 403
    with signed_in_client(frontend, people["admin"]) as admin:
        assert admin.delete(f"/api/v1/studies/{task_id}").status_code == 204
        page = admin.get("/admin/audit", params={"study": task_id})
        assert page.status_code == 200
        assert "delete" in page.text
        exported = admin.get("/admin/audit", params={"study": task_id, "format": "jsonl"})
        assert [line for line in exported.text.splitlines() if '"delete"' in line]
    record = frontend.registry.study(task_id)
    assert record is not None
    assert record.identity is None
    assert record.original_filename == "(deleted)"
    assert not (frontend.settings.storage.root / "results" / task_id).exists()

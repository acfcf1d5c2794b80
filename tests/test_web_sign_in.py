"""Signing in as a person does, in headless Chromium on the real web server: a local account
through the sign-in page (every request of the page then carries the CSRF token), single
sign-on against a real OIDC provider started by the test (oidc-provider-mock), HTTPS, and
the page without sign-in."""

from __future__ import annotations

import datetime as dt
import ipaddress
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from oidc_provider_mock import User, run_server_in_thread
from playwright.sync_api import Browser, expect
from stack_support import stack_settings, wait_for
from web_support import (
    PASSWORD,
    finished_study,
    sign_in_page,
    try_sign_in,
    web_frontend,
)
from worklist_page import worklist_rows

from services.core.access import Role
from services.core.config import Settings
from services.core.config.services import OidcSettings
from services.registry.audit import AuditAction, AuditQuery

pytestmark = [pytest.mark.rabbitmq, pytest.mark.browser]
SIZES = ((1280, 800), (1920, 1080))


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with stack_settings(tmp_path / "storage", "signin") as settings:
        yield settings


def small_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("image.dcm", b"not really DICOM " * 10)
    return path


def test_a_radiologist_signs_in_works_the_list_and_signs_out(
    settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    with web_frontend(settings) as frontend:
        name = frontend.add_user("dr.house", Role.RADIOLOGIST)
        task_id, _ = finished_study(frontend, sender="ORTHANC")
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.goto(f"{frontend.url}/")
        expect(page.locator("#sign-in")).to_be_visible()
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            page.screenshot(path=str(tmp_path / f"sign-in-{width}x{height}.png"))
        page.set_viewport_size({"width": 1280, "height": 800})
        sign_in_page(page, frontend.url, name)
        expect(page.locator("#user-bar")).to_contain_text("dr.house")
        expect(page.locator("#user-bar")).to_contain_text("radiologist")
        row = page.locator(f'#worklist tr[data-key="{task_id}:0"]')
        expect(row).to_have_count(1, timeout=30_000)
        # The page's own requests (Gradio's upload and queue) pass the CSRF check.
        page.locator("#tool-bar input[type=file]").set_input_files(
            str(small_zip(tmp_path / "Doe_Jane_1950-01-01.zip"))  # as people name files
        )
        expect(page.locator("#upload-message")).to_contain_text("Queued 1 study", timeout=30_000)
        row.click()
        expect(page.locator("#study-view")).to_contain_text("PATHOLOGY", timeout=30_000)
        # The study's report table downloads under its task, not output.xlsx.
        with page.expect_download() as study_file:
            page.locator("#study-view .sv-download").first.click()
        assert study_file.value.suggested_filename == (
            f"chest-ct_task-{task_id[:8]}_screening.xlsx"
        )
        with page.expect_download() as download:
            page.locator("#download-all").click()
        assert download.value.suggested_filename.startswith("chest-ct-worklist-")
        page.once("dialog", lambda dialog: dialog.accept())
        row.locator(".wl-remove").click()
        expect(row).to_have_count(0, timeout=30_000)
        for width, height in SIZES:
            page.set_viewport_size({"width": width, "height": height})
            page.screenshot(path=str(tmp_path / f"worklist-{width}x{height}.png"))
        page.locator("#sign-out").click()
        page.wait_for_url("**/sign-in", timeout=30_000)
        page.goto(f"{frontend.url}/")
        expect(page.locator("#sign-in")).to_be_visible()  # the session is gone
        context.close()
        actions = [e.action for e in frontend.registry.audit.events(AuditQuery(actor=name))]
        for expected in (
            AuditAction.SIGN_IN,
            AuditAction.LIST,
            AuditAction.UPLOAD,
            AuditAction.VIEW_STUDY,
            AuditAction.DOWNLOAD_XLSX,
            AuditAction.HIDE,
            AuditAction.SIGN_OUT,
        ):
            assert expected in actions, (expected, actions)
        uploads = frontend.registry.audit.events(
            AuditQuery(actor=name, actions=(AuditAction.UPLOAD,))
        )
        recorded = frontend.registry.study(str(uploads[0].task_id))
        assert recorded is not None
        assert recorded.sender == name  # the registry knows who sent it
        # The append-only trail keeps the door and size, never the file's name.
        assert uploads[0].detail.startswith("page upload, routine, ")
        assert "Doe_Jane" not in uploads[0].model_dump_json()


def test_single_sign_on_with_the_hospital_provider(
    settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    people = [
        User(sub="alice", claims={"preferred_username": "alice", "roles": ["radiology"]}),
        User(sub="mallory", claims={"preferred_username": "mallory", "roles": ["cafeteria"]}),
    ]
    with run_server_in_thread(user_claims=people) as provider:
        settings.frontend.oidc = OidcSettings(
            issuer=f"http://127.0.0.1:{provider.server_port}",
            client_id="chest-ct-screening",
            client_secret="client-secret-of-the-test",  # type: ignore[arg-type]
            role_map={"radiology": Role.RADIOLOGIST, "ct-techs": Role.TECHNOLOGIST},
        )
        with web_frontend(settings) as frontend:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            page = context.new_page()
            for who in ("alice", "mallory"):
                page.goto(f"{frontend.url}/")
                page.locator("a.sso").click()
                page.locator("input[name=sub]").last.fill(who)
                page.locator("input[name=sub]").last.press("Enter")
                if who == "alice":
                    page.locator("#worklist tbody").wait_for(state="attached", timeout=60_000)
                    expect(page.locator("#user-bar")).to_contain_text("alice")
                    expect(page.locator("#user-bar")).to_contain_text("radiologist")
                    page.screenshot(path=str(tmp_path / "sso-signed-in.png"))
                    page.locator("#sign-out").click()
                    page.wait_for_url("**/sign-in", timeout=30_000)
                else:
                    expect(page.locator(".message")).to_contain_text("no role in this system")
            context.close()
            account = frontend.registry.accounts.user("alice")
            assert account is not None
            assert account.role is Role.RADIOLOGIST
            assert account.source.value == "oidc"
            assert frontend.registry.accounts.user("mallory") is None
            trail = frontend.registry.audit.events(AuditQuery(actions=(AuditAction.SIGN_IN,)))
            assert [(e.actor, e.detail) for e in trail] == [("alice", "oidc")]
            refused = frontend.registry.audit.events(
                AuditQuery(actions=(AuditAction.SIGN_IN_FAILED,))
            )
            assert [(e.actor, e.detail) for e in refused] == [
                ("mallory", "oidc: no role for this account")
            ]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (a site brings its own)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "frontend.crt", folder / "frontend.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_serves_the_page_with_secure_cookies(
    settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    settings.frontend.tls_certificate, settings.frontend.tls_key = self_signed(tmp_path)
    with web_frontend(settings) as frontend:
        assert frontend.url.startswith("https://")
        name = frontend.add_user("nurse.tls", Role.TECHNOLOGIST)
        with httpx.Client(
            base_url=frontend.url, verify=str(settings.frontend.tls_certificate)
        ) as client:
            answer = try_sign_in(client, name, PASSWORD)
            assert answer.status_code == 200
            for header in answer.headers.get_list("set-cookie"):
                if header.startswith(("cts_session=", "cts_csrf=")):
                    assert "secure" in header.lower(), header
        plain = frontend.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/healthz", timeout=10)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        sign_in_page(page, frontend.url, name)
        expect(page.locator("#user-bar")).to_contain_text("technologist")
        context.close()


def test_without_sign_in_every_page_says_so_in_red(
    settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    settings.frontend.sign_in = False
    with web_frontend(settings) as frontend:
        task_id, _ = finished_study(frontend, sender=None)
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.goto(f"{frontend.url}/")
        banner = page.locator("#sign-in-off")
        expect(banner).to_be_visible(timeout=60_000)
        assert banner.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(176, 0, 32)"
        wait_for(
            lambda: any(r["key"] == f"{task_id}:0" for r in worklist_rows(page)) or None, 30, "row"
        )
        page.screenshot(path=str(tmp_path / "sign-in-off.png"))
        assert httpx.get(f"{frontend.url}/api/v1/studies/{task_id}", timeout=30).status_code == 200

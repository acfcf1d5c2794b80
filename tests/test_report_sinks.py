"""Where the structured reports go: destinations by kind (DIMSE C-STORE, DICOMweb STOW-RS)
in the configuration, their outbox folders, how a STOW-RS answer is read, and the STOW-RS
sink against a scripted HTTP server (every answer a server may give) and against a real
Orthanc with its DICOMweb plugin (filed, waiting through an outage, refused).

The hospital-integration tests send the screened studies' SRs to a DIMSE PACS and a
DICOMweb archive at once (tests/test_hospital_integration.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import get_args

import pydicom
import pytest
from orthanc_support import ARCHIVE_PASSWORD, ARCHIVE_USER, Orthanc, dicomweb_archive
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from pydicom.dataset import Dataset
from stack_support import wait_for

from services.core.config import (
    PROJECT_ROOT,
    Backoff,
    DicomSettings,
    DimseDestination,
    HttpCredentials,
    ReportDestination,
    StowRsDestination,
    load_settings,
)
from services.core.dicom.headers import read_studies
from services.core.errors import ConfigurationError
from services.core.schemas import IntakeSummary, ProcessingStatus, StudyReport
from services.dicom_listener.export import ReportSender, create_sink
from services.dicom_listener.metrics import DESTINATION_KINDS, ListenerMetrics
from services.dicom_listener.outbox import FAILED_DIR, SENT_DIR, Outbox, destination_name
from services.dicom_listener.report_sink import DestinationRefused, DestinationUnavailable
from services.dicom_listener.service import check_distinct_outboxes
from services.dicom_listener.stow_rs_sink import (
    MissingSecret,
    StowAnswer,
    StowRsSink,
    read_secret,
    read_stow_answer,
    stow_outcome,
)
from services.sr.document import DocumentContext, build_structured_report
from services.sr.evidence import read_evidence
from services.triton.local_server import free_local_ports

CHEST = "chest_ct_lung_dx_a0002"
PASSWORD_ENV = "CTS_TEST_ARCHIVE_PASSWORD"
SOP_UID = "2.25.1234"
OTHER_UID = "2.25.5678"


# -- the configuration ---------------------------------------------------------------------


def test_a_destination_without_kind_is_dimse_and_keeps_its_outbox(tmp_path: Path) -> None:
    """A configuration file from before STOW-RS: same destination, same outbox folder."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "dicom:\n  destinations:\n    - {ae_title: PACS, host: 10.0.0.5, port: 104}\n"
    )
    (destination,) = load_settings(config, environ={}).dicom.destinations
    assert destination == DimseDestination(ae_title="PACS", host="10.0.0.5", port=104)
    assert destination.kind == "dimse"
    assert destination_name(destination) == "PACS@10.0.0.5_104"


def test_both_kinds_from_the_environment() -> None:
    destinations = (
        "[{kind: dimse, ae_title: PACS, host: pacs, port: 104},"
        " {kind: stow-rs, url: 'https://vna.example:8443/dicom-web/', tls_verify: false,"
        "  credentials: {scheme: bearer, secret_env: VNA_TOKEN}}]"
    )
    settings = load_settings(environ={"CTS__DICOM__DESTINATIONS": destinations})
    dimse, stow = settings.dicom.destinations
    assert isinstance(dimse, DimseDestination)
    assert isinstance(stow, StowRsDestination)
    assert stow.url == "https://vna.example:8443/dicom-web"  # the client appends /studies
    assert stow.tls_verify is False
    assert stow.credentials == HttpCredentials(scheme="bearer", secret_env="VNA_TOKEN")
    assert destination_name(stow) == "stowrs_vna.example_8443_dicom-web"


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"kind": "wado-rs", "url": "http://pacs/dicom-web"}, "does not match any of the expected"),
        ({"kind": "stow-rs", "url": "ftp://pacs/dicom-web"}, "http:// or https://"),
        ({"kind": "stow-rs", "url": "pacs:8042/dicom-web"}, "http:// or https://"),
        ({"kind": "stow-rs", "url": "http://u:secret@pacs/dicom-web"}, "no credentials in the URL"),
        ({"kind": "stow-rs", "url": "http://pacs/dicom-web?token=1"}, "no query"),
        ({"kind": "stow-rs", "url": "http://pacs:99999/dicom-web"}, "out of range"),
        ({"kind": "stow-rs", "ae_title": "PACS", "url": "http://pacs/"}, "ae_title"),
        ({"kind": "dimse", "url": "http://pacs/dicom-web"}, "ae_title"),
        (
            {"kind": "stow-rs", "url": "https://pacs/", "tls_verify": False, "tls_ca_bundle": "ca"},
            "tls_verify is false",
        ),
        (
            {"kind": "stow-rs", "url": "http://p/", "credentials": {"scheme": "basic"}},
            "exactly one of secret_env and secret_file",
        ),
        (
            {
                "kind": "stow-rs",
                "url": "http://p/",
                "credentials": {"scheme": "basic", "secret_env": "X"},
            },
            "a username goes with the basic scheme",
        ),
        (
            {
                "kind": "stow-rs",
                "url": "http://p/",
                "credentials": {"scheme": "bearer", "username": "u", "secret_env": "X"},
            },
            "a username goes with the basic scheme",
        ),
    ],
)
def test_a_wrong_destination_is_refused_with_the_reason(entry: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        DicomSettings.model_validate({"destinations": [entry]})


def test_the_metrics_know_every_kind_of_destination() -> None:
    models = get_args(get_args(ReportDestination)[0])
    kinds = {get_args(model.model_fields["kind"].annotation)[0] for model in models}
    assert set(DESTINATION_KINDS) == kinds == {"dimse", "stow-rs"}


# -- outbox folders ------------------------------------------------------------------------


def stow(url: str, **values: object) -> StowRsDestination:
    return StowRsDestination.model_validate({"kind": "stow-rs", "url": url, **values})


def test_outbox_folders_differ_by_kind_and_say_only_the_address() -> None:
    assert destination_name(stow("http://127.0.0.1:8042/dicom-web")) == (
        "stowrs_127.0.0.1_8042_dicom-web"
    )
    assert destination_name(stow("https://vna.example/api/v2/dicomweb")) == (
        "stowrs_vna.example_443_api_v2_dicomweb"
    )
    assert destination_name(stow("http://vna.example")) == "stowrs_vna.example_80"
    # An AE title that looks like a STOW-RS folder still gets a DIMSE one (with its "@").
    tricky = DimseDestination(ae_title="stowrs_h_80", host="x", port=1)
    assert destination_name(tricky) == "stowrs_h_80@x_1"
    assert "@" not in destination_name(stow("http://h:80/x@y"))
    long_path = "/" + "/".join(["segment"] * 40)
    first = destination_name(stow(f"http://h{long_path}/a"))
    second = destination_name(stow(f"http://h{long_path}/b"))
    assert len(first) <= 120
    assert len(second) <= 120
    assert first != second


def test_the_listener_refuses_two_destinations_with_one_outbox() -> None:
    same = [stow("http://h:8042/dicom-web"), stow("http://h:8042/dicom-web/")]
    with pytest.raises(ConfigurationError, match="stowrs_h_8042_dicom-web"):
        check_distinct_outboxes(same)
    check_distinct_outboxes([stow("http://h:8042/dicom-web"), stow("http://h:8043/dicom-web")])


# -- secrets -------------------------------------------------------------------------------


def test_secrets_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  file-token\n")
    by_file = HttpCredentials(scheme="bearer", secret_file=token_file)
    by_env = HttpCredentials(scheme="basic", username="cts", secret_env="PASSWORD")
    assert read_secret(by_file, {}) == "file-token"
    assert read_secret(by_env, {"PASSWORD": "env-password"}) == "env-password"
    with pytest.raises(MissingSecret, match="environment variable PASSWORD"):
        read_secret(by_env, {})
    with pytest.raises(MissingSecret, match="is empty"):
        read_secret(by_env, {"PASSWORD": " "})
    token_file.unlink()
    with pytest.raises(MissingSecret, match="FileNotFoundError"):
        read_secret(by_file, {})


def test_a_stow_rs_destination_without_its_secret_stops_the_listener() -> None:
    destination = stow(
        "http://h/dicom-web", credentials={"scheme": "bearer", "secret_env": "CTS_TEST_NO_SUCH"}
    )
    with pytest.raises(ConfigurationError, match="CTS_TEST_NO_SUCH"):
        StowRsSink(destination, environ={})


def test_the_listener_exits_2_before_touching_storage_without_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    storage = tmp_path / "storage"
    config.write_text(
        f"storage: {{root: {storage}}}\n"
        "metrics: {enabled: false}\n"
        "dicom:\n"
        "  destinations:\n"
        "    - kind: stow-rs\n"
        "      url: http://127.0.0.1:9/dicom-web\n"
        "      credentials: {scheme: bearer, secret_env: CTS_TEST_NO_SUCH_TOKEN}\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "CTS_CONFIG"}
    environment.pop("CTS_TEST_NO_SUCH_TOKEN", None)
    completed = subprocess.run(
        [sys.executable, "-m", "services.dicom_listener", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={key: value for key, value in environment.items() if not key.startswith("CTS__")},
        cwd=PROJECT_ROOT,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "CTS_TEST_NO_SUCH_TOKEN is empty or not set" in completed.stderr
    assert not storage.exists()


# -- reading a STOW-RS answer --------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (StowAnswer(200), "HTTP 200"),
        (StowAnswer(204), "HTTP 204"),
        (StowAnswer(202), "HTTP 202"),
        (StowAnswer(202, warning_reasons=(0xB007,)), "HTTP 202, warning 0xB007"),
        (StowAnswer(200, warning_reasons=(0xB000, 0xB006)), "HTTP 200, warning 0xB000 0xB006"),
    ],
)
def test_stored_answers(answer: StowAnswer, status: str) -> None:
    assert stow_outcome(answer, "archive") == status


@pytest.mark.parametrize("http_status", [408, 429, 500, 502, 503, 504])
def test_answers_that_mean_try_again_later(http_status: int) -> None:
    with pytest.raises(DestinationUnavailable, match=f"archive: HTTP {http_status}"):
        stow_outcome(StowAnswer(http_status), "archive")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (StowAnswer(400), "HTTP 400"),
        (StowAnswer(401), "HTTP 401"),
        (StowAnswer(403), "HTTP 403"),
        (StowAnswer(404), "HTTP 404"),
        (StowAnswer(409, failure_reasons=(0xA900,)), "HTTP 409, failure reason 0xA900"),
        (StowAnswer(413), "HTTP 413"),
        (StowAnswer(415), "HTTP 415"),
        (StowAnswer(302), "HTTP 302 (a redirect"),
        (StowAnswer(307), "HTTP 307 (a redirect"),
        # Orthanc answers 200 with a FailedSOPSequence; the standard says 202 or 409.
        (StowAnswer(200, failure_reasons=(0x0110,)), "HTTP 200, failure reason 0x0110"),
        (StowAnswer(202, failure_reasons=(None,)), "HTTP 202, failure reason not given"),
    ],
)
def test_answers_that_refuse_the_report(answer: StowAnswer, message: str) -> None:
    with pytest.raises(DestinationRefused, match=re.escape(f"archive: {message}")):
        stow_outcome(answer, "archive")


def stow_response(
    *, stored: list[tuple[str, int | None]] = (), failed: list[tuple[str, int | None]] = ()
) -> bytes:
    """A STOW-RS response body (DICOM JSON): (SOPInstanceUID, warning or failure reason)."""

    def item(uid: str, keyword: str, reason: int | None) -> Dataset:
        entry = Dataset()
        entry.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        entry.ReferencedSOPInstanceUID = uid
        if reason is not None:
            setattr(entry, keyword, reason)
        return entry

    body = Dataset()
    body.ReferencedSOPSequence = [item(uid, "WarningReason", reason) for uid, reason in stored]
    body.FailedSOPSequence = [item(uid, "FailureReason", reason) for uid, reason in failed]
    return body.to_json().encode()


def test_a_response_body_is_read_for_the_instance_sent() -> None:
    json_type = "application/dicom+json; charset=utf-8"
    stored = stow_response(stored=[(SOP_UID, None)])
    assert read_stow_answer(200, json_type, stored, SOP_UID) == StowAnswer(200)
    warned = stow_response(stored=[(SOP_UID, 0xB007)], failed=[(OTHER_UID, 0xA900)])
    assert read_stow_answer(202, json_type, warned, SOP_UID) == StowAnswer(202, (), (0xB007,))
    failed = stow_response(failed=[(SOP_UID, 0xC000)])
    assert read_stow_answer(202, json_type, failed, SOP_UID) == StowAnswer(202, (0xC000,), ())
    # Not DICOM JSON (an error page, a proxy's text, nothing): the status code decides.
    orthanc_error = b'{"HttpError": "Not Found", "HttpStatus": 404}'
    assert read_stow_answer(404, "application/json", orthanc_error, SOP_UID) == StowAnswer(404)
    assert read_stow_answer(502, "text/html", b"<html>bad gateway", SOP_UID) == StowAnswer(502)
    assert read_stow_answer(200, json_type, b"", SOP_UID) == StowAnswer(200)
    assert read_stow_answer(200, json_type, b"[1, 2]", SOP_UID) == StowAnswer(200)


# -- the STOW-RS sink against a scripted server -----------------------------------------------


@pytest.fixture(scope="module")
def report_document(fixtures_dir: Path) -> Dataset:
    """A real screening SR (a Failure report: no model needed) of the chest fixture."""
    (study,) = read_studies(sorted((fixtures_dir / CHEST).iterdir()), IntakeSummary())
    evidence = read_evidence(study.series[0])
    assert evidence is not None
    report = StudyReport(
        path_to_study="sink test",
        study_uid=evidence.study_uid,
        processing_status=ProcessingStatus.FAILURE,
        failure_reason="a report for the sink tests",
    )
    context = DocumentContext(key="sink-tests", model_version="test", pathology_threshold=0.5)
    return build_structured_report(report, evidence, context)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedDicomWeb:
    """An HTTP server on 127.0.0.1 that answers each POST with ``status`` and ``body`` after
    ``delay_s``, and keeps every request it received."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/dicom+json"
    extra_headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                script.received.append(Received(self.path, dict(self.headers.items()), body))
                time.sleep(script.delay_s)
                self.send_response(script.status)
                self.send_header("Content-Type", script.content_type)
                self.send_header("Content-Length", str(len(script.body)))
                for name, value in script.extra_headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(script.body)

            def log_message(self, *_args: object) -> None:
                pass  # quiet: pytest shows the failures that matter

        return Handler


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedDicomWeb, str]]:
    script = ScriptedDicomWeb()
    server = ThreadingHTTPServer(("127.0.0.1", 0), script.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_a_bearer_token_from_a_file_and_a_stored_answer(
    scripted: tuple[ScriptedDicomWeb, str], report_document: Dataset, tmp_path: Path
) -> None:
    script, url = scripted
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    sink = StowRsSink(
        stow(url, credentials={"scheme": "bearer", "secret_file": str(token_file)}), environ={}
    )
    uid = str(report_document.SOPInstanceUID)
    script.body = stow_response(stored=[(uid, None)])
    assert sink.send(report_document) == "HTTP 200"
    token_file.write_text("rotated-token\n")  # read again for every report
    script.status, script.body = 202, stow_response(stored=[(uid, 0xB007)])
    assert sink.send(report_document) == "HTTP 202, warning 0xB007"
    first, second = script.received
    assert first.path == "/dicom-web/studies"
    assert first.headers["Authorization"] == "Bearer first-token"
    assert second.headers["Authorization"] == "Bearer rotated-token"
    assert first.headers["Content-Type"].startswith("multipart/related")
    assert 'type="application/dicom"' in first.headers["Content-Type"]
    # The part is the report itself, as a DICOM file.
    assert b"DICM" in first.body
    assert uid.encode() in first.body


@pytest.mark.parametrize(
    ("status", "failed_reason", "error", "message"),
    [
        (503, None, DestinationUnavailable, "HTTP 503"),
        (429, None, DestinationUnavailable, "HTTP 429"),
        (401, None, DestinationRefused, "HTTP 401"),
        (409, 0xA900, DestinationRefused, "HTTP 409, failure reason 0xA900"),
        (202, 0xC000, DestinationRefused, "HTTP 202, failure reason 0xC000"),
    ],
)
def test_answers_of_a_server_through_the_client(
    scripted: tuple[ScriptedDicomWeb, str],
    report_document: Dataset,
    status: int,
    failed_reason: int | None,
    error: type[Exception],
    message: str,
) -> None:
    script, url = scripted
    script.status = status
    if failed_reason is not None:
        script.body = stow_response(failed=[(str(report_document.SOPInstanceUID), failed_reason)])
    with pytest.raises(error, match=message):
        StowRsSink(stow(url)).send(report_document)
    assert len(script.received) == 1  # one request: the sender's backoff does the retrying


def test_a_redirect_is_refused_not_followed(
    scripted: tuple[ScriptedDicomWeb, str], report_document: Dataset
) -> None:
    script, url = scripted
    script.status = 302
    script.extra_headers = {"Location": url.replace("/dicom-web", "/elsewhere")}
    with pytest.raises(DestinationRefused, match="HTTP 302"):
        StowRsSink(stow(url)).send(report_document)
    assert [request.path for request in script.received] == ["/dicom-web/studies"]


def test_a_timeout_and_a_closed_port_mean_try_again(
    scripted: tuple[ScriptedDicomWeb, str], report_document: Dataset
) -> None:
    script, url = scripted
    script.delay_s = 2.0
    with pytest.raises(DestinationUnavailable, match="ReadTimeout"):
        StowRsSink(stow(url, timeout_s=0.3)).send(report_document)
    closed = f"http://127.0.0.1:{free_local_ports(1)[0]}/dicom-web"
    with pytest.raises(DestinationUnavailable, match="ConnectionError"):
        StowRsSink(stow(closed)).send(report_document)


# -- the sender and a real Orthanc with the DICOMweb plugin -----------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[Orthanc]:
    with dicomweb_archive(tmp_path_factory.mktemp("dicomweb-archive")) as server:
        yield server


@dataclass
class RunningSender:
    outbox: Outbox
    sender: ReportSender
    stop: threading.Event
    registry: CollectorRegistry

    def reports(self, result: str) -> float | None:
        labels = {"kind": "stow-rs", "result": result}
        return self.registry.get_sample_value("cts_dicom_reports_sent_total", labels)

    def close(self) -> None:
        self.stop.set()
        self.sender.join(10)
        assert not self.sender.is_alive(), "the sender did not stop"


def start_sender(storage: Path, destination: StowRsDestination) -> RunningSender:
    settings = DicomSettings(export_backoff=Backoff(initial_s=0.2, maximum_s=1.0))
    outbox = Outbox(storage, destination)
    stop = threading.Event()
    registry = CollectorRegistry()
    sender = ReportSender(
        outbox,
        create_sink(destination, settings),
        settings=settings,
        stop_event=stop,
        metrics=ListenerMetrics(registry),
    )
    sender.start()
    return RunningSender(outbox, sender, stop, registry)


def archive_destination(archive: Orthanc) -> StowRsDestination:
    credentials = {"scheme": "basic", "username": ARCHIVE_USER, "secret_env": PASSWORD_ENV}
    return stow(archive.dicomweb_url, credentials=credentials, timeout_s=5)


def report_file(document: Dataset, folder: Path, key: str) -> Path:
    """``document`` as a new instance (UIDs of its own), saved as the adapters save SRs."""
    copy = pydicom.dcmread(save(document, folder / "template.dcm"))
    uid = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'cts-sink-test/{key}').int}"
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = uid
    return save(copy, folder / f"{key}.dcm")


@pytest.fixture
def report_to_send(
    report_document: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[Path, str]]:
    """``(key, password=ARCHIVE_PASSWORD) -> (path, SOPInstanceUID)``: a new instance of the
    report under tmp_path/reports, with ``password`` as the archive's secret in the
    environment the sender reads it from."""

    def new_report(key: str, password: str = ARCHIVE_PASSWORD) -> tuple[Path, str]:
        monkeypatch.setenv(PASSWORD_ENV, password)
        path = report_file(report_document, tmp_path / "reports", key)
        return path, str(pydicom.dcmread(path).SOPInstanceUID)

    return new_report


def save(document: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.slow
def test_a_report_sent_by_stow_rs_is_filed_by_orthanc(
    archive: Orthanc, report_document: Dataset, report_to_send, tmp_path: Path
) -> None:
    path, uid = report_to_send("filed")
    running = start_sender(tmp_path / "storage", archive_destination(archive))
    try:
        assert running.outbox.name == f"stowrs_127.0.0.1_{archive.http_port}_dicom-web"
        assert running.outbox.enqueue("task-filed", path)
        running.sender.wake.set()
        filed = wait_for(lambda: archive.instance(uid), 30, "the SR in the DICOMweb archive")
        wait_for(lambda: running.outbox.sent_count() == 1, 10, "the sent marker")
    finally:
        running.close()
    assert filed.SOPInstanceUID == uid
    assert filed.StudyInstanceUID == report_document.StudyInstanceUID
    assert filed.SOPClassUID == report_document.SOPClassUID
    assert running.outbox.pending() == []
    (marker,) = (running.outbox.directory / SENT_DIR).glob("*.json")
    assert '"status":"HTTP 200"' in marker.read_text()
    assert running.reports("delivered") == 1


@pytest.mark.slow
def test_a_report_waits_while_the_archive_is_down_and_is_sent_once(
    archive: Orthanc, report_to_send, tmp_path: Path
) -> None:
    path, uid = report_to_send("outage")
    stored_before = archive.instance_count()
    archive.stop()
    running = start_sender(tmp_path / "storage", archive_destination(archive))
    try:
        try:
            assert running.outbox.enqueue("task-outage", path)
            running.sender.wake.set()
            time.sleep(4.0)  # several failed sends at 0.2 .. 1.0 s apart
            assert len(running.outbox.pending()) == 1
            assert list((running.outbox.directory / FAILED_DIR).iterdir()) == []
        finally:
            archive.start()
        wait_for(lambda: archive.instance(uid), 30, "the waiting SR after the archive came back")
        wait_for(lambda: running.outbox.pending() == [], 10, "the outbox emptied")
        time.sleep(2.0)  # a second send would show by now
    finally:
        running.close()
    assert archive.instance_count() == stored_before + 1
    assert running.outbox.sent_count() == 1
    assert running.reports("delivered") == 1


@pytest.mark.slow
def test_a_refused_report_goes_to_failed_with_its_status(
    archive: Orthanc, report_to_send, tmp_path: Path
) -> None:
    path, uid = report_to_send("refused", password="not-the-password")  # Orthanc answers 401
    running = start_sender(tmp_path / "storage", archive_destination(archive))
    failed = running.outbox.directory / FAILED_DIR
    try:
        assert running.outbox.enqueue("task-refused", path)
        running.sender.wake.set()
        wait_for(lambda: list(failed.glob("*.json")), 30, "the refusal noted in failed/")
    finally:
        running.close()
    (note,) = failed.glob("*.json")
    assert "HTTP 401" in note.read_text()
    assert [item.name for item in failed.glob("*.dcm")] == ["task-refused_refused.dcm"]
    assert running.outbox.pending() == []
    assert running.outbox.sent_count() == 0
    assert archive.instance(uid) is None
    assert running.reports("failed") == 1
    assert running.reports("delivered") == 0


def test_a_report_purged_while_its_sender_holds_it_is_passed_over(
    report_document: Dataset, tmp_path: Path
) -> None:
    """A purge (another process: services/registry/retention.py) may take a task's outbox
    item after the sender listed it, or while it is on its way: the sender goes on with the
    next, and nothing of the task stays in failed/."""
    from services.registry.retention import purge_task_files

    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    destination = DimseDestination(ae_title="PACS", host="127.0.0.1", port=free_local_ports(1)[0])
    outbox = Outbox(settings.storage.root, destination)
    sender = ReportSender(
        outbox,
        create_sink(destination, settings.dicom),
        settings=settings.dicom,
        stop_event=threading.Event(),
        metrics=ListenerMetrics(CollectorRegistry()),
    )
    path = report_file(report_document, tmp_path / "reports", "study_0001_0123456789ab")
    assert outbox.enqueue("task-listed", path)
    (listed,) = outbox.pending()
    purge_task_files(settings, "task-listed")
    assert sender._deliver(listed)  # the sender goes on
    assert outbox.enqueue("task-sending", path)
    (sending,) = outbox.pending()
    purge_task_files(settings, "task-sending")
    outbox.mark_failed(sending, "refused")  # the destination refused it meanwhile
    assert outbox.pending() == []
    assert list((outbox.directory / FAILED_DIR).iterdir()) == []
    assert list((outbox.directory / SENT_DIR).iterdir()) == []

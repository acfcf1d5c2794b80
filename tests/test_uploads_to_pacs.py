"""The SRs of web and REST uploads on their way to the PACS (``dicom.send_uploads_to_pacs``),
against a real Orthanc and the real study registry (SQLite and PostgreSQL): the listener finds
a finished upload in the registry and sends its SR once (a second listener does not send it
again), records a task without an SR as such, and leaves the DICOM door's own tasks to its
book; a study screened twice has a second SR that supersedes the first, the adapter's
EarlierReports asking the registry which SRs came before.

The SRs are the adapter's: the real pipeline (tiny demo repository, ONNX Runtime) on the chest
fixture, written by the adapter's ``structured_report_files``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from orthanc_support import ORTHANC_AE, Orthanc
from prometheus_client import CollectorRegistry
from registry_support import BACKEND_PARAMETERS, registry_url, task_submission
from stack_support import wait_for

from services.adapter.predecessors import EarlierReports
from services.adapter.task_runner import sr_context, structured_report_files
from services.broker.schemas import ResultFile, StudyResult, TaskStatus
from services.broker.storage import result_files_dir, store_result
from services.core.config import Backoff, DimseDestination, Settings, load_settings
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.pipeline import process_input
from services.core.schemas import StudyReport
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.outbox import destination_name
from services.dicom_listener.service import DicomListener
from services.dicom_listener.uploads_to_pacs import LOOK_EVERY_S, NO_REPORT
from services.registry import Door, Registry
from services.registry.records import Delivery
from services.sr.evidence import EvidenceCollector, StudyEvidence
from services.triton.local_server import free_local_ports

pytestmark = pytest.mark.slow

CHEST = "chest_ct_lung_dx_a0002"
Screened = list[tuple[StudyReport, StudyEvidence | None]]


@dataclass
class Screening:
    backend: InferenceBackend
    chest: Screened  # the chest fixture's report and evidence


@pytest.fixture(scope="module")
def screening(tiny_model_repository: Path, fixtures_dir: Path) -> Iterator[Screening]:
    settings = load_settings(environ={})
    settings.inference.backend = "onnxruntime"
    settings.inference.model_repository = tiny_model_repository
    backend = create_backend(settings)
    collector = EvidenceCollector()
    try:
        process_input(fixtures_dir / CHEST, backend=backend, settings=settings, events=collector)
        assert [evidence is not None for _report, evidence in collector.studies] == [True]
        yield Screening(backend, collector.studies)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("pacs"))
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.close()


def new_id(name: str) -> str:
    """A task id of this run (an SR's UIDs follow from its task; the PACS is the module's)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=BACKEND_PARAMETERS)
def settings(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_model_repository: Path,
    orthanc: Orthanc,
) -> Iterator[Settings]:
    with registry_url(request.param, tmp_path / "registry") as url:
        settings = load_settings(environ={})
        settings.storage.root = tmp_path / "storage"
        settings.registry.url = url.render_as_string(hide_password=False)
        settings.inference.model_repository = tiny_model_repository
        settings.metrics.enabled = False
        dicom = settings.dicom
        dicom.port = free_local_ports(1)[0]
        dicom.send_uploads_to_pacs = True
        dicom.export_backoff = Backoff(initial_s=0.5, maximum_s=2.0)
        dicom.network_timeout_s = 10.0
        dicom.destinations = [
            DimseDestination(ae_title=ORTHANC_AE, host="127.0.0.1", port=orthanc.dicom_port)
        ]
        yield settings


def finish_task(
    settings: Settings,
    screening: Screening,
    task_id: str,
    door: Door,
    *,
    finished_at: datetime,
    reports: Screened | None = None,
) -> list[ResultFile]:
    """A task of ``door`` through the registry as the stack records it: submitted, then its
    result (stored first, as adapters do); its SR files written by the adapter's code, with
    the adapter's EarlierReports (the registry); ``reports`` without evidence: no SR."""
    root = settings.storage.root
    studies = screening.chest if reports is None else reports
    received = finished_at - timedelta(seconds=30)
    earlier = EarlierReports(settings)
    registry = Registry.open(settings)
    try:
        registry.record_submission(task_submission(task_id, at=received, door=door))
        files = structured_report_files(
            root,
            result_files_dir(root, task_id),
            studies,
            sr_context(task_id, screening.backend, settings, earlier),
        )
        result = StudyResult(
            task_id=task_id,
            status=TaskStatus.COMPLETED,
            reports=[report for report, _evidence in studies],
            files=files,
            original_filename=f"{task_id}.zip",
            study_path=f"uploads/{task_id}/{task_id}.zip",
            adapter_id="adapter-test",
            started_at=received,
            finished_at=finished_at,
            seconds=30.0,
        )
        store_result(root, result)
        registry.record_result(result)
    finally:
        registry.close()
        earlier.close()
    return files


def sr_of(settings: Settings, files: list[ResultFile]) -> pydicom.Dataset:
    (item,) = [item for item in files if item.kind == "sr"]
    return pydicom.dcmread(settings.storage.root / item.path)


def delivery_rows(settings: Settings, task_id: str) -> list[Delivery]:
    registry = Registry.open(settings)
    try:
        return registry.deliveries(task_id)
    finally:
        registry.close()


def deliveries(settings: Settings, task_id: str) -> list[tuple[int, str, str, str | None]]:
    """(report index, destination, state, SOP Instance UID) of each delivery of the task."""
    return [
        (item.report_index, item.destination, item.state, item.sop_instance_uid)
        for item in delivery_rows(settings, task_id)
    ]


def sent_reports(metrics: CollectorRegistry) -> float:
    labels = {"kind": "dimse", "result": "delivered"}
    return metrics.get_sample_value("cts_dicom_reports_sent_total", labels) or 0.0


def run_listener(settings: Settings, until, what: str, *, at_least_s: float = 0.0) -> float:
    """A listener (metrics of its own) running until ``until()`` holds and ``at_least_s``
    passed; the reports it sent."""
    metrics = CollectorRegistry()
    listener = DicomListener(settings, metrics=ListenerMetrics(metrics))
    listener.start()
    began = time.monotonic()
    try:
        wait_for(until, 60, what)
        time.sleep(max(0.0, at_least_s - (time.monotonic() - began)))
    finally:
        listener.stop()
    return sent_reports(metrics)


def test_an_uploads_sr_goes_to_the_pacs_once_and_the_registry_says_so(
    settings: Settings, screening: Screening, orthanc: Orthanc
) -> None:
    now = datetime.now(UTC)
    upload_id, nifti_id, pacs_id = new_id("web-upload"), new_id("rest-nifti"), new_id("from-pacs")
    upload = finish_task(settings, screening, upload_id, Door.UPLOAD, finished_at=now)
    nifti_report = screening.chest[0][0].model_copy(
        update={"path_to_study": "chest.nii.gz", "study_uid": None}
    )
    nifti = finish_task(
        settings, screening, nifti_id, Door.REST, finished_at=now, reports=[(nifti_report, None)]
    )
    # A study the PACS sent: the listener's book sends its SR, not the uploads' lookup.
    finish_task(settings, screening, pacs_id, Door.DICOM, finished_at=now)
    assert nifti == []
    document = sr_of(settings, upload)
    uid = str(document.SOPInstanceUID)
    (destination,) = [destination_name(item) for item in settings.dicom.destinations]

    def delivered() -> bool:
        return [state for _i, _d, state, _u in deliveries(settings, upload_id)] == ["sent"]

    sent = run_listener(settings, delivered, "the upload's SR sent", at_least_s=1.0)
    filed = orthanc.instance(uid)
    assert filed is not None
    assert filed.StudyInstanceUID == document.StudyInstanceUID
    assert filed.PatientID == document.PatientID
    assert sent == 1
    assert deliveries(settings, upload_id) == [(0, destination, "sent", uid)]
    assert deliveries(settings, nifti_id) == [(0, destination, NO_REPORT, None)]
    assert deliveries(settings, pacs_id) == []

    # The PACS loses it; a listener started again (it looks at once, then every 5 s) finds
    # nothing to send and writes nothing: the registry knows where each upload stands.
    recorded = [delivery_rows(settings, task) for task in (upload_id, nifti_id)]
    orthanc_id = orthanc.client.post(
        "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
    ).json()[0]
    orthanc.client.delete(f"/instances/{orthanc_id}").raise_for_status()
    again = run_listener(settings, lambda: True, "", at_least_s=LOOK_EVERY_S + 2.0)
    assert again == 0
    assert orthanc.instance(uid) is None
    assert [delivery_rows(settings, task) for task in (upload_id, nifti_id)] == recorded


def test_a_study_sent_twice_has_a_second_sr_that_supersedes_the_first(
    settings: Settings, screening: Screening, orthanc: Orthanc
) -> None:
    """Both uploads' SRs reach the PACS; the second names the first in its Predecessor
    Documents Sequence (found by the adapter's EarlierReports in the registry), the first
    names none."""
    now = datetime.now(UTC)
    first_id, second_id = new_id("first-send"), new_id("second-send")
    first_files = finish_task(
        settings, screening, first_id, Door.UPLOAD, finished_at=now - timedelta(minutes=5)
    )
    second_files = finish_task(settings, screening, second_id, Door.REST, finished_at=now)
    first, second = sr_of(settings, first_files), sr_of(settings, second_files)
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    registry = Registry.open(settings)
    try:
        assert registry.earlier_reports_with_sr(str(first.StudyInstanceUID)) == [
            (first_id, 0),
            (second_id, 0),
        ]
    finally:
        registry.close()

    def both_sent() -> bool:
        states = deliveries(settings, first_id) + deliveries(settings, second_id)
        return [state for _i, _d, state, _u in states] == ["sent", "sent"]

    run_listener(settings, both_sent, "both SRs sent")
    filed = {
        str(document.SOPInstanceUID): document
        for document in orthanc.structured_reports(str(first.StudyInstanceUID))
    }
    assert str(first.SOPInstanceUID) in filed
    assert str(second.SOPInstanceUID) in filed
    assert "PredecessorDocumentsSequence" not in filed[str(first.SOPInstanceUID)]
    (study,) = filed[str(second.SOPInstanceUID)].PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == first.SOPClassUID

"""The DICOM listener: batches of received instances closed into StudyTasks exactly once
(StudyBook, on files), and the running listener with DCMTK's storescu and echoscu as the
sending side and the real RabbitMQ broker taking its tasks."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from loguru import logger
from sr_support import require_tool
from stack_support import stack_settings, take_tasks, wait_for

from services.broker.schemas import StudyTask
from services.core.config import Settings
from services.dicom_listener.service import DicomListener
from services.dicom_listener.studies import BatchState, StudyBook, study_key
from services.registry import Door, Registry, StudyFilter, StudyState
from services.registry.audit import AuditAction, AuditQuery
from services.triton.local_server import free_local_ports

CHEST = "chest_ct_lung_dx_a0002"
QUIET_S = 1.5


def instances_of(fixtures_dir: Path, name: str) -> list[tuple[Path, pydicom.Dataset]]:
    return [
        (path, pydicom.dcmread(path, stop_before_pixels=True))
        for path in sorted((fixtures_dir / name).iterdir())
    ]


def receive(book: StudyBook, path: Path, header: pydicom.Dataset, calling_ae: str = "PACS") -> bool:
    """What the C-STORE handler does with one instance; False when refused."""
    data = path.read_bytes()
    slot = book.begin_instance(
        str(header.StudyInstanceUID), str(header.SOPInstanceUID), calling_ae, len(data)
    )
    if slot is None:
        return False
    slot.path.write_bytes(data)
    book.end_instance(slot, stored=True, image=header.Modality != "SR")
    return True


# -- StudyBook: no network ----------------------------------------------------------------


def test_a_quiet_study_becomes_one_task_by_reference(tmp_path: Path, fixtures_dir: Path) -> None:
    book = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    instances = instances_of(fixtures_dir, CHEST)
    for path, header in instances:
        assert receive(book, path, header)
    assert book.close_due(time.time() + 5) == []  # not quiet for long enough yet
    (record,) = book.close_due(time.time() + 11)
    assert record.state is BatchState.CLOSED
    assert record.task is not None
    assert (record.instances, record.images) == (len(instances), len(instances))
    folder = record.task.resolve_study_path(tmp_path)
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        f"{header.SOPInstanceUID}.dcm" for _path, header in instances
    )
    assert not record.late
    assert not record.task.late_instances
    assert "late" not in record.task.original_filename
    assert book.close_due(time.time() + 60) == []  # closed once
    assert [item.task_id for item in book.in_state(BatchState.CLOSED)] == [record.task_id]
    # Names on disk carry no UID: the record is keyed by a hash of the study UID.
    assert str(instances[0][1].StudyInstanceUID) not in json.dumps(record.model_dump(mode="json"))


def test_a_restart_goes_on_with_the_same_study_and_task(tmp_path: Path, fixtures_dir: Path) -> None:
    instances = instances_of(fixtures_dir, CHEST)
    first = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    for path, header in instances[:10]:
        receive(first, path, header)
    # The listener stops while the study is arriving; a new one takes over the same storage.
    second = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    assert second.receiving() == 1
    for path, header in instances[10:]:
        receive(second, path, header)
    (record,) = second.close_due(time.time() + 11)
    assert record.instances == len(instances)
    # Closed but stopped before the publish was recorded: the next start publishes the same task.
    third = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    assert [item.task_id for item in third.in_state(BatchState.CLOSED)] == [record.task_id]
    third.advance(record.task_id, BatchState.PUBLISHED)
    fourth = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    assert fourth.in_state(BatchState.CLOSED) == []
    assert [item.task_id for item in fourth.in_state(BatchState.PUBLISHED)] == [record.task_id]


def test_instances_after_completion_are_a_new_flagged_task(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    book = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    instances = instances_of(fixtures_dir, CHEST)
    for path, header in instances[:-1]:
        receive(book, path, header)
    (first,) = book.close_due(time.time() + 11)
    receive(book, *instances[-1])
    (late,) = book.close_due(time.time() + 22)
    assert late.task_id != first.task_id
    assert late.task is not None
    assert late.late
    assert late.part == 2
    assert late.instances == 1
    assert "late instances" in late.task.original_filename
    assert "late" in (late.task.submitted_by or "")
    assert late.task.late_instances  # the adapter flags its reports: late_instances


def test_a_study_over_the_size_limit_is_refused_and_removed(
    tmp_path: Path, fixtures_dir: Path
) -> None:
    instances = instances_of(fixtures_dir, CHEST)
    size = instances[0][0].stat().st_size
    book = StudyBook(tmp_path, quiet_s=10, max_bytes=size * 5)
    accepted = [receive(book, path, header) for path, header in instances]
    assert accepted[:5] == [True] * 5
    assert not any(accepted[5:])
    (record,) = book.close_due(time.time() + 11)
    assert record.state is BatchState.DISCARDED
    assert "max_study_mb" in (record.reason or "")
    assert not book.folder(record.task_id).exists()


def test_structured_reports_alone_are_not_screened(tmp_path: Path, fixtures_dir: Path) -> None:
    """An SR sent alone (e.g. our own result coming back with its study) starts no task."""
    book = StudyBook(tmp_path, quiet_s=10, max_bytes=10**9)
    path, header = instances_of(fixtures_dir, CHEST)[0]
    data = path.read_bytes()
    slot = book.begin_instance(str(header.StudyInstanceUID), "1.2.3.4", "PACS", len(data))
    assert slot is not None
    slot.path.write_bytes(data)
    book.end_instance(slot, stored=True, image=False)
    (record,) = book.close_due(time.time() + 11)
    assert record.state is BatchState.DISCARDED
    assert "no image" in (record.reason or "")
    assert study_key(str(header.StudyInstanceUID)) == record.study_key


# -- the running listener: DCMTK clients, the real broker ------------------------------------


@pytest.fixture
def listener_settings(tmp_path: Path) -> Iterator[Settings]:
    with stack_settings(tmp_path / "storage", "listener") as settings:
        settings.dicom.port = free_local_ports(1)[0]
        settings.dicom.study_quiet_seconds = QUIET_S
        yield settings


def queued_tasks(settings: Settings) -> list[StudyTask]:
    """Take every task waiting in the test's task lanes (every priority's)."""
    return take_tasks(settings.rabbitmq)


def storescu(
    port: int, files: list[Path], *, calling_ae: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    tool = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [tool, "-aet", calling_ae, "-aec", "CTS", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_for_published(listener: DicomListener, count: int) -> None:
    wait_for(
        lambda: len(listener.book.in_state(BatchState.PUBLISHED)) >= count,
        30,
        f"{count} published task(s)",
    )


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_storescu_study_becomes_one_task_across_a_listener_restart(
    listener_settings: Settings, fixtures_dir: Path
) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    files = sorted((fixtures_dir / CHEST).iterdir())
    # The emergency department's scanner: its studies are urgent, in the registry too.
    listener_settings.dicom.calling_ae_priorities = {"MODALITY": "urgent"}
    listener = DicomListener(listener_settings)
    listener.start()
    try:
        port = listener.port
        echo = subprocess.run(
            [echoscu, "-aet", "MODALITY", "-aec", "CTS", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo.returncode == 0, echo.stderr
        assert storescu(port, files[:12]).returncode == 0
    finally:
        listener.stop()
    # The study was still arriving: the next listener goes on with it.
    listener = DicomListener(listener_settings)
    listener.start()
    try:
        sent = storescu(port, files[12:])
        assert sent.returncode == 0, sent.stderr
        wait_for_published(listener, 1)
        time.sleep(QUIET_S * 2)  # nothing more comes of it
    finally:
        listener.stop()
    # Restarted once more after publishing: nothing is published again.
    listener = DicomListener(listener_settings)
    listener.start()
    time.sleep(QUIET_S * 2)
    listener.stop()
    (task,) = queued_tasks(listener_settings)
    folder = task.resolve_study_path(listener_settings.storage.root)
    assert len(list(folder.iterdir())) == len(files)
    assert task.original_filename == f"DICOM from MODALITY: {len(files)} images"
    source = pydicom.dcmread(files[0])
    received = pydicom.dcmread(folder / f"{source.SOPInstanceUID}.dcm")
    assert received.PixelData == source.PixelData  # stored as sent
    # Recorded once in the registry, before it was queued: the door and who sent it.
    registry = Registry.open(listener_settings)
    try:
        (record,) = registry.list_studies(StudyFilter()).items
    finally:
        registry.close()
    assert (record.task_id, record.door, record.sender) == (task.task_id, Door.DICOM, "MODALITY")
    assert record.state is StudyState.QUEUED
    assert record.original_filename == task.original_filename
    assert task.priority.value == record.priority.value == "urgent"


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_late_instances_and_refused_callers(
    listener_settings: Settings, fixtures_dir: Path
) -> None:
    files = sorted((fixtures_dir / CHEST).iterdir())
    listener_settings.dicom.allowed_calling_ae_titles = ["MODALITY"]
    lines: list[str] = []
    sink = logger.add(lines.append, level="DEBUG")
    listener = DicomListener(listener_settings)
    listener.start()
    try:
        refused = storescu(listener.port, files[:1], calling_ae="INTRUDER")
        assert refused.returncode != 0
        assert storescu(listener.port, files[:-1]).returncode == 0
        wait_for_published(listener, 1)
        assert storescu(listener.port, files[-1:]).returncode == 0
        wait_for_published(listener, 2)
    finally:
        listener.stop()
        logger.remove(sink)
    first, late = queued_tasks(listener_settings)
    assert "late" not in first.original_filename
    assert "late" in late.original_filename
    assert len(list(late.resolve_study_path(listener_settings.storage.root).iterdir())) == 1
    refusals = [line for line in lines if "INTRUDER" in line]
    assert refusals
    assert "not allowed" in refusals[0]
    # Each association is in the registry's audit trail (door_audit.py), the refused one too.
    registry = Registry.open(listener_settings)
    try:
        rows = registry.audit.events(AuditQuery())
    finally:
        registry.close()
    assert [(row.action, row.actor) for row in rows] == [
        (AuditAction.ASSOCIATION_REFUSED, "INTRUDER"),
        (AuditAction.ASSOCIATION_ACCEPTED, "MODALITY"),
        (AuditAction.ASSOCIATION_ACCEPTED, "MODALITY"),
    ]
    assert rows[0].detail == "calling AE title not allowed"
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    for value in (str(patient.PatientName), str(patient.PatientID), str(patient.StudyInstanceUID)):
        assert not any(value in line for line in lines), "patient data in the listener's log"
    shutil.rmtree(listener_settings.storage.root, ignore_errors=True)

"""The frontend's logic without a browser: uploads are recorded in the study registry and
become tasks on the real broker; what the adapters report reaches the registry through its
queue; back-pressure, files screened before, hiding, queue places. (The page itself is driven
in Chromium by test_stack_e2e.py.)
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_support import stack_settings, take_tasks, wait_for

from services.broker.connection import connect, publish_to_registry
from services.broker.schemas import (
    Priority,
    QueueTopology,
    StudyProgress,
    StudyResult,
    TaskStatus,
)
from services.core.access import Principal, PrincipalKind, Role
from services.core.config import Settings
from services.core.schemas import FindingResult, ProcessingStatus, StudyReport
from services.frontend import worklist_rows
from services.frontend.service import FrontendService
from services.frontend.task_view import SubmitOutcome
from services.registry import Door, StudyState

pytestmark = pytest.mark.rabbitmq
VIEWER = "browser:test"


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    with stack_settings(tmp_path / "storage", "frontend") as settings:
        settings.rabbitmq.max_queue_depth = 3
        settings.frontend.max_upload_mb = 1
        yield settings


@pytest.fixture
def service(settings: Settings) -> Iterator[FrontendService]:
    service = FrontendService(settings, instance_id="frontend-test")
    yield service
    service.stop()


def make_zip(path: Path, size: int = 100) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.dcm", b"x" * size)
    return path


def test_uploads_are_recorded_then_queued(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    first = make_zip(tmp_path / "first study.zip")
    second = make_zip(tmp_path / "second.zip", size=101)
    loose = [tmp_path / "slice1.dcm", tmp_path / "slice2.dcm"]
    for path in loose:
        path.write_bytes(b"DICM")
    outcome = service.submit_uploads(VIEWER, "jdoe", [first, second, *loose])
    assert outcome.refused == []
    assert [record.original_filename for record in outcome.submitted] == [
        "first study.zip",
        "second.zip",
        "slice1.dcm (+1 files)",
    ]
    tasks = {task.task_id: task for task in take_tasks(settings.rabbitmq, Priority.ROUTINE)}
    assert set(tasks) == {record.task_id for record in outcome.submitted}
    for submitted in outcome.submitted:
        task = tasks[submitted.task_id]
        assert task.reply_to is None  # results go to the registry's queue
        assert task.resolve_study_path(settings.storage.root).exists()
        assert submitted.door is Door.UPLOAD
        assert submitted.sender == "jdoe"
        assert submitted.state is StudyState.QUEUED
    # Moved, not copied: no second copy of patient data stays in the upload folder.
    assert not first.exists()
    assert not loose[0].exists()
    dicom_task = tasks[outcome.submitted[2].task_id]
    folder = dicom_task.resolve_study_path(settings.storage.root)
    assert sorted(path.name for path in folder.iterdir()) == [
        "00000_slice1.dcm",
        "00001_slice2.dcm",
    ]
    # A restarted frontend, or another viewer, sees the same list (the department's).
    again = FrontendService(settings, instance_id="frontend-test-2")
    try:
        listed = again.worklist_records("browser:someone-else")
    finally:
        again.stop()
    assert {record.task_id for record in listed} == {record.task_id for record in outcome.submitted}


def test_full_queue_and_oversized_files_are_refused(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    big = make_zip(tmp_path / "big.zip", size=2 * 1024 * 1024)  # limit is 1 MB (stored)
    outcome = service.submit_uploads(VIEWER, None, [big])
    assert outcome.submitted == []
    assert "over the 1 MB limit" in outcome.message
    studies = [make_zip(tmp_path / f"s{index}.zip", size=100 + index) for index in range(4)]
    too_many = service.submit_uploads(VIEWER, None, studies)  # 4 > max_queue_depth 3
    assert too_many.submitted == []
    assert "queue is full" in too_many.message
    assert take_tasks(settings.rabbitmq, Priority.ROUTINE) == []
    assert service.worklist_records(VIEWER) == []  # nothing recorded either
    assert len(service.submit_uploads(VIEWER, None, studies[:3]).submitted) == 3
    refused = service.submit_uploads(VIEWER, None, studies[3:])
    assert refused.submitted == []
    assert "3 studies waiting, limit 3" in refused.message
    assert len(service.worklist_records(VIEWER)) == 3


def report(status: ProcessingStatus, probability: float | None) -> StudyReport:
    return StudyReport(
        path_to_study="study.zip",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        probability_of_pathology=probability,
        pathology=None if probability is None else int(probability >= 0.5),
        processing_status=status,
        time_of_processing=2.5,
        most_dangerous_pathology_type="Cancer" if probability else None,
        findings=[FindingResult(label="Cancer", probability=0.7, threshold=0.5, positive=True)]
        if probability
        else [],
        demo_weights=True,
        failure_reason=None if probability else "not a chest CT: no lungs",
    )


def test_what_the_adapters_report_reaches_the_registry(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    service.start()
    outcome = service.submit_uploads(
        VIEWER, None, [make_zip(tmp_path / "a.zip"), make_zip(tmp_path / "b.zip", size=101)]
    )
    first, second = (record.task_id for record in outcome.submitted)
    topology = QueueTopology.from_settings(settings.rabbitmq)

    def state_of(task_id: str) -> StudyState | None:
        record = service.registry.study(task_id)
        return None if record is None else record.state

    connection = connect(settings.rabbitmq, name="fake adapter", give_up_after_s=10)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        progress = StudyProgress(task_id=first, stage="inference", fraction=0.6)
        publish_to_registry(channel, topology, progress, persistent=False)
        wait_for(lambda: state_of(first) is StudyState.PROCESSING, 15, "progress")
        for task_id, status, row in (
            (first, TaskStatus.COMPLETED, report(ProcessingStatus.SUCCESS, 0.75)),
            (second, TaskStatus.FAILED, report(ProcessingStatus.FAILURE, None)),
        ):
            result = StudyResult(task_id=task_id, status=status, reports=[row], error="x")
            publish_to_registry(channel, topology, result)
        wait_for(lambda: state_of(second) is StudyState.FAILED, 15, "the results")
    finally:
        connection.close()
    records = service.worklist_records(VIEWER)
    assert {record.task_id: record.state for record in records} == {
        first: StudyState.DONE,
        second: StudyState.FAILED,
    }
    worklist = worklist_rows.worklist(records).model_dump(mode="json")
    by_file = {row["file"]: row for row in worklist["rows"]}
    assert by_file["a.zip"]["badge_text"] == "PATHOLOGY"  # P 0.75 over the threshold
    assert by_file["a.zip"]["probability"] == 0.75
    assert by_file["b.zip"]["badge_text"] == "Failed"  # never "done"
    assert by_file["b.zip"]["status"] == "not a chest CT: no lungs"
    assert [row["file"] for row in worklist["rows"]] == ["a.zip", "b.zip"]  # urgency order
    assert service.demo_weights_in_use(records)


def test_a_file_screened_before_is_not_queued_again(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    study = make_zip(tmp_path / "chest.zip")
    twin = tmp_path / "twin" / "chest copy.zip"
    twin.parent.mkdir()
    twin.write_bytes(study.read_bytes())
    first = service.submit_uploads(VIEWER, None, [study, twin])  # the same bytes twice in one go
    assert len(first.submitted) == 1
    original = first.submitted[0]
    # Hidden by this viewer, then uploaded again by another: it is shown again, not queued.
    assert service.hide(VIEWER, original.task_id, 0)
    assert service.worklist_records(VIEWER) == []
    copy = tmp_path / "again" / "chest.zip"
    copy.parent.mkdir()
    copy.write_bytes(original_bytes := (settings.storage.root / original.study_path).read_bytes())
    assert original_bytes
    second = service.submit_uploads(VIEWER, None, [copy])
    assert second.submitted == []
    assert [earlier.task_id for _name, earlier in second.screened_before] == [original.task_id]
    assert "already screened" in second.message
    assert "not recomputed" in second.message
    assert not copy.exists()  # the earlier copy is in storage; this one is not kept
    (queued,) = take_tasks(settings.rabbitmq, Priority.ROUTINE)
    assert queued.task_id == original.task_id
    assert [record.task_id for record in service.worklist_records(VIEWER)] == [original.task_id]


def test_a_technologist_sending_anothers_study_again_is_told_what_is_true(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    """The same bytes from a technologist who may not open the earlier row: not queued, and
    the message says the result is not on their list and whom to ask, naming nobody."""

    def person(name: str, role: Role) -> Principal:
        return Principal(name=name, role=role, kind=PrincipalKind.USER)

    def resend(who: Principal) -> SubmitOutcome:
        copy = tmp_path / who.name / "chest.zip"
        copy.parent.mkdir()
        copy.write_bytes(study_bytes)
        return service.submit_uploads(f"user:{who.name}", who.name, [copy], principal=who)

    sender, other = person("tech1", Role.TECHNOLOGIST), person("tech2", Role.TECHNOLOGIST)
    study = make_zip(tmp_path / "chest.zip")
    study_bytes = study.read_bytes()
    first = service.submit_uploads("user:tech1", "tech1", [study], principal=sender)
    (original,) = first.submitted
    again = resend(other)
    assert again.submitted == []
    assert again.screened_before == []
    assert again.screened_elsewhere == ["chest.zip"]
    assert "already screened" in again.message
    assert "not on your list" in again.message
    assert "ask" in again.message
    assert "row is shown" not in again.message
    assert "tech1" not in again.message
    assert f"{original.received_at:%Y-%m-%d}" not in again.message
    assert original.task_id not in {r.task_id for r in service.worklist_for(other, None)}
    (queued,) = take_tasks(settings.rabbitmq, Priority.ROUTINE)
    assert queued.task_id == original.task_id
    # Whoever may open the earlier row is shown it, as before.
    for who in (sender, person("rad1", Role.RADIOLOGIST)):
        shown = resend(who)
        assert [earlier.task_id for _name, earlier in shown.screened_before] == [original.task_id]
        assert "its row is shown" in shown.message
        assert original.task_id in {r.task_id for r in service.worklist_for(who, None)}


def test_hiding_is_for_one_viewer(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    outcome = service.submit_uploads(VIEWER, None, [make_zip(tmp_path / "a.zip")])
    task_id = outcome.submitted[0].task_id
    assert service.hide(VIEWER, task_id, 0)
    assert not service.hide(VIEWER, task_id, 0)
    assert not service.hide(VIEWER, "no-such-task", 0)
    assert service.worklist_records(VIEWER) == []
    assert [record.task_id for record in service.worklist_records("browser:other")] == [task_id]


def test_queued_studies_know_their_place_in_the_queue(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    settings.rabbitmq.max_queue_depth = 10
    outcome = service.submit_uploads(
        VIEWER,
        None,
        [make_zip(tmp_path / f"s{index}.zip", size=100 + index) for index in range(3)],
    )
    # The page's STAT toggle: recorded with the study, and first in the order adapters take.
    stat = service.submit_uploads(
        VIEWER, None, [make_zip(tmp_path / "emergency.zip", size=99)], priority=Priority.STAT
    )
    (stat_record,) = stat.submitted
    assert stat_record.priority.value == "stat"
    places = service.queue_places()
    assert places[stat_record.task_id].ahead == 0
    assert [places[record.task_id].ahead for record in outcome.submitted] == [1, 2, 3]
    assert {place.workers for place in places.values()} == {0}  # no adapter consumes it
    assert {place.expected_wait_s for place in places.values()} == {None}
    rows = worklist_rows.worklist(service.worklist_records(VIEWER), places).rows
    assert {row.status for row in rows} == {"waiting: no worker is connected to the queue"}

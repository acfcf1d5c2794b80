"""The frontend's logic without a browser: uploads become tasks on the real broker, sessions
live on disk, back-pressure, progress and results from the reply queue and from storage.
(The page itself is driven in Chromium by test_stack_e2e.py.)
"""

from __future__ import annotations

import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_support import delete_topology, wait_for

from services.broker.connection import connect, publish_reply
from services.broker.schemas import (
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    decode_message,
)
from services.broker.storage import store_result
from services.core.config import Settings, load_settings
from services.core.schemas import FindingResult, ProcessingStatus, StudyReport
from services.frontend import views
from services.frontend.service import (
    FrontendService,
    TaskState,
)

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    settings.rabbitmq.queue_prefix = f"test-frontend-{uuid.uuid4().hex[:10]}"
    settings.rabbitmq.max_queue_depth = 3
    settings.frontend.max_upload_mb = 1
    yield settings
    topology = QueueTopology.from_settings(settings.rabbitmq)
    delete_topology(settings.rabbitmq, [topology.reply_queue("frontend-test")])


@pytest.fixture
def service(settings: Settings) -> Iterator[FrontendService]:
    service = FrontendService(settings, instance_id="frontend-test")
    yield service
    service.stop()


def make_zip(path: Path, size: int = 100) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.dcm", b"x" * size)
    return path


def queued_tasks(settings: Settings) -> list[StudyTask]:
    topology = QueueTopology.from_settings(settings.rabbitmq)
    connection = connect(settings.rabbitmq, name="test reader", give_up_after_s=10)
    tasks = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(topology.task_queue)
            if method is None:
                break
            tasks.append(decode_message(body, type_name=properties.type))
        connection.close()  # unacked: they go back to the queue
    finally:
        if connection.is_open:
            connection.close()
    return tasks


def test_uploads_become_tasks_in_the_session(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    token = service.new_session_token()
    first = make_zip(tmp_path / "first study.zip")
    second = make_zip(tmp_path / "second.zip", size=101)
    loose = [tmp_path / "slice1.dcm", tmp_path / "slice2.dcm"]
    for path in loose:
        path.write_bytes(b"DICM")
    outcome = service.submit_uploads(token, [first, second, *loose])
    assert outcome.refused == []
    assert [task.original_filename for task in outcome.submitted] == [
        "first study.zip",
        "second.zip",
        "slice1.dcm (+1 files)",
    ]
    tasks = {task.task_id: task for task in queued_tasks(settings)}
    assert set(tasks) == {task.task_id for task in outcome.submitted}
    for submitted in outcome.submitted:
        task = tasks[submitted.task_id]
        assert task.reply_to == service.reply_queue
        assert task.correlation_id == task.task_id
        assert task.resolve_study_path(settings.storage.root).exists()
    # Moved, not copied: no second copy of patient data stays in the upload folder.
    assert not first.exists()
    assert not loose[0].exists()
    dicom_task = tasks[outcome.submitted[2].task_id]
    folder = dicom_task.resolve_study_path(settings.storage.root)
    assert sorted(path.name for path in folder.iterdir()) == [
        "00000_slice1.dcm",
        "00001_slice2.dcm",
    ]
    # A restarted frontend (a new service on the same storage) sees the same session.
    again = FrontendService(settings, instance_id="frontend-test")
    assert [view.task.task_id for view in again.session_views(token)] == [
        task.task_id for task in outcome.submitted
    ]
    assert {view.state for view in again.session_views(token)} == {TaskState.QUEUED}


def test_full_queue_and_oversized_files_are_refused(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    token = service.new_session_token()
    big = make_zip(
        tmp_path / "big.zip", size=2 * 1024 * 1024
    )  # limit is 1 MB (stored, not deflated)
    outcome = service.submit_uploads(token, [big])
    assert outcome.submitted == []
    assert "over the 1 MB limit" in outcome.message
    # Different contents: the same bytes twice would be one study and its duplicate.
    studies = [make_zip(tmp_path / f"s{index}.zip", size=100 + index) for index in range(4)]
    too_many = service.submit_uploads(token, studies)  # 4 > max_queue_depth 3
    assert too_many.submitted == []
    assert "queue is full" in too_many.message
    assert queued_tasks(settings) == []
    assert len(service.submit_uploads(token, studies[:3]).submitted) == 3
    refused = service.submit_uploads(token, studies[3:])
    assert refused.submitted == []
    assert "3 studies waiting, limit 3" in refused.message
    assert len(service.session(token).tasks) == 3


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


def test_progress_and_results_reach_the_session(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    service.start()
    token = service.new_session_token()
    outcome = service.submit_uploads(
        token, [make_zip(tmp_path / "a.zip"), make_zip(tmp_path / "b.zip", size=101)]
    )
    first, second = (task.task_id for task in outcome.submitted)
    connection = connect(settings.rabbitmq, name="fake adapter", give_up_after_s=10)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        publish_reply(
            channel,
            StudyProgress(
                task_id=first, stage="inference", fraction=0.6, message="running the model"
            ),
            reply_to=service.reply_queue,
            correlation_id=first,
            persistent=False,
        )
        wait_for(
            lambda: service.session_views(token)[0].state is TaskState.PROCESSING, 15, "progress"
        )
        result = StudyResult(
            task_id=first,
            status=TaskStatus.COMPLETED,
            reports=[report(ProcessingStatus.SUCCESS, 0.75)],
        )
        publish_reply(channel, result, reply_to=service.reply_queue, correlation_id=first)
        wait_for(lambda: service.session_views(token)[0].state is TaskState.DONE, 15, "the result")
    finally:
        connection.close()
    # The second result only reaches storage (as if it came while the frontend was down).
    store_result(
        settings.storage.root,
        StudyResult(
            task_id=second,
            status=TaskStatus.FAILED,
            error="given up",
            reports=[report(ProcessingStatus.FAILURE, None)],
        ),
    )
    task_views = service.session_views(token)
    assert [view.state for view in task_views] == [TaskState.DONE, TaskState.FAILED]
    assert task_views[0].fraction == 1.0

    worklist = views.worklist(task_views)
    by_file = {row["file"]: row for row in worklist["rows"]}
    assert by_file["a.zip"]["badge_text"] == "PATHOLOGY"  # P 0.75 over the threshold
    assert by_file["a.zip"]["probability"] == 0.75
    assert by_file["b.zip"]["badge_text"] == "Failure"  # never "done"
    assert by_file["b.zip"]["status"] == "not a chest CT: no lungs"
    assert [row["file"] for row in worklist["rows"]] == ["a.zip", "b.zip"]  # urgency order
    assert service.demo_weights_in_use(task_views)

    xlsx = service.session_xlsx(token)
    assert xlsx is not None
    assert xlsx.is_file()
    assert service.file_path(xlsx.relative_to(settings.storage.root).as_posix()) == xlsx.resolve()
    assert service.file_path("../../etc/passwd") is None
    again = service.session_xlsx(token)
    assert again is not None
    assert not xlsx.exists()


def test_the_same_upload_twice_is_a_duplicate_not_a_second_task(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    token = service.new_session_token()
    study = make_zip(tmp_path / "chest.zip")
    copy = tmp_path / "again" / "chest.zip"
    copy.parent.mkdir()
    copy.write_bytes(study.read_bytes())
    twin = tmp_path / "twin" / "chest copy.zip"
    twin.parent.mkdir()
    twin.write_bytes(study.read_bytes())
    first = service.submit_uploads(token, [study, twin])  # the same bytes twice in one go
    assert len(first.submitted) == 1
    assert len(first.duplicates) == 1
    assert first.duplicates[0].duplicate_of == first.submitted[0].task_id
    second = service.submit_uploads(token, [copy])  # and once more, later
    assert second.submitted == []
    (duplicate,) = second.duplicates
    assert duplicate.duplicate_of == first.submitted[0].task_id
    assert "already screened" in second.message
    assert "not recomputed" in second.message
    assert not copy.exists()  # the earlier copy is in storage; this one is not kept
    assert [task.task_id for task in queued_tasks(settings)] == [first.submitted[0].task_id]
    # The duplicate shows the first upload's result, flagged as such, and adds no xlsx row.
    store_result(
        settings.storage.root,
        StudyResult(
            task_id=first.submitted[0].task_id,
            status=TaskStatus.COMPLETED,
            reports=[report(ProcessingStatus.SUCCESS, 0.25)],
        ),
    )
    task_views = service.session_views(token)
    assert [view.state for view in task_views] == [TaskState.DONE] * 3
    rows = views.worklist(task_views)["rows"]
    flagged = [row for row in rows if row["flags"]]
    assert len(flagged) == 2
    assert {row["task_id"] for row in flagged} == {first.duplicates[0].task_id, duplicate.task_id}
    assert all("duplicate of chest.zip" in row["flags"][0] for row in flagged)
    # Removing rows takes them off the worklist; the stored result stays.
    assert service.remove_task(token, duplicate.task_id)
    assert service.remove_task(token, first.duplicates[0].task_id)
    assert not service.remove_task(token, duplicate.task_id)
    assert [view.task.task_id for view in service.session_views(token)] == [
        first.submitted[0].task_id
    ]


def test_queued_studies_know_their_place_in_the_queue(
    settings: Settings, service: FrontendService, tmp_path: Path
) -> None:
    settings.rabbitmq.max_queue_depth = 10
    token = service.new_session_token()
    outcome = service.submit_uploads(
        token, [make_zip(tmp_path / f"s{index}.zip", size=100 + index) for index in range(3)]
    )
    assert [task.queued_behind for task in outcome.submitted] == [0, 1, 2]
    task_views = service.session_views(token)
    assert [view.ahead for view in task_views] == [0, 1, 2]
    assert {view.workers for view in task_views} == {0}  # no adapter consumes this queue
    rows = views.worklist(task_views)["rows"]
    assert {row["status"] for row in rows} == {"waiting: no worker is connected to the queue"}

"""Message schemas and queue topology as plain data (tests/test_broker.py uses the real broker)."""

from __future__ import annotations

import pytest

from services.broker.schemas import (
    BROKER_SCHEMA_VERSION,
    MessageError,
    QueueTopology,
    StudyTask,
    decode_message,
    encode_message,
)


def test_task_round_trip_keeps_every_field() -> None:
    task = StudyTask(
        study_path="uploads/abc/study.zip",
        original_filename="study.zip",
        reply_to="cts.replies.frontend1",
        submitted_by="pacs-bridge",
    )
    decoded = decode_message(encode_message(task), type_name="StudyTask")
    assert decoded == task
    assert decoded.schema_version == BROKER_SCHEMA_VERSION
    assert decoded.reply_correlation_id == task.task_id  # no explicit correlation id


@pytest.mark.parametrize(
    "study_path", ["/etc/passwd", "../outside.zip", "uploads/../../x.zip", "", "a\\b.zip"]
)
def test_task_refuses_paths_outside_storage(study_path: str) -> None:
    with pytest.raises(ValueError, match="storage root"):
        StudyTask(study_path=study_path, original_filename="x.zip")


@pytest.mark.parametrize("task_id", ["../x", "a/b", "", "x" * 65, ".hidden"])
def test_task_refuses_ids_that_are_not_safe_file_names(task_id: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        StudyTask(task_id=task_id, study_path="uploads/a.zip", original_filename="a.zip")


def test_unknown_schema_version_and_type_are_refused() -> None:
    body = encode_message(StudyTask(study_path="uploads/a.zip", original_filename="a.zip"))
    newer = body.replace(b'"schema_version":1', b'"schema_version":2')
    with pytest.raises(MessageError, match="StudyTask"):
        decode_message(newer, StudyTask)
    with pytest.raises(MessageError, match="unknown message type"):
        decode_message(body, type_name="SomethingElse")
    with pytest.raises(MessageError, match="expected a StudyTask"):
        decode_message(body, StudyTask, type_name="StudyResult")
    with pytest.raises(MessageError):
        decode_message(b"not json", StudyTask)


def test_resolve_study_path_stays_inside_the_root(tmp_path) -> None:
    task = StudyTask(study_path="uploads/t1/study.zip", original_filename="study.zip")
    assert task.resolve_study_path(tmp_path) == (tmp_path / "uploads/t1/study.zip").resolve()
    # A symlink inside storage that points outside is refused as well.
    (tmp_path / "uploads").mkdir()
    (tmp_path / "uploads" / "escape").symlink_to("/etc")
    sneaky = StudyTask(study_path="uploads/escape/passwd", original_filename="x")
    with pytest.raises(ValueError, match="leaves the storage root"):
        sneaky.resolve_study_path(tmp_path)


def test_topology_names_follow_the_prefix() -> None:
    topology = QueueTopology(prefix="site-a", max_deliveries=4)
    assert topology.task_exchange == "site-a.tasks"
    assert topology.task_queue == "site-a.tasks"
    assert topology.dead_letter_exchange == "site-a.dead-letter"
    assert topology.dead_letter_queue == "site-a.tasks.dead-letter"
    assert topology.reply_queue("frontend7") == "site-a.replies.frontend7"
    arguments = topology.task_queue_arguments()
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == 4
    assert arguments["x-dead-letter-exchange"] == "site-a.dead-letter"
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        topology.reply_queue("../x")

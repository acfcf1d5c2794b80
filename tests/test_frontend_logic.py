"""The frontend's pure helpers (tests/test_frontend.py drives the service with the real broker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.broker.schemas import QueueTopology, ResultFile, StudyResult, TaskStatus
from services.core.schemas import FindingResult, IntakeSummary, ProcessingStatus, StudyReport
from services.frontend import views
from services.frontend.queue_status import (
    QueueMonitor,
    QueueStatus,
    StudyDurations,
    expected_wait_s,
    tasks_ahead,
)
from services.frontend.service import (
    FrontendService,
    frontend_instance_id,
    is_session_token,
    safe_file_name,
)
from services.frontend.sessions import SessionStore, SessionTask
from services.frontend.study_view import study_view
from services.frontend.task_view import TaskState, TaskView, with_queue_places
from services.frontend.uploads import content_sha256


def test_file_names_and_ids_are_safe() -> None:
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\studies\\Ivanov Ivan.zip") == "Ivanov_Ivan.zip"
    assert safe_file_name("...") == "upload"
    identifier = frontend_instance_id("127.0.0.1", 7860)
    assert identifier.endswith("-7860")
    QueueTopology().reply_queue(identifier)  # a valid queue name part
    assert is_session_token(FrontendService.new_session_token())
    assert not is_session_token("../sessions/x")


def test_auth_setting_is_parsed_strictly() -> None:
    from services.frontend.__main__ import parse_auth

    assert parse_auth(None) is None
    assert parse_auth("radiologist:s3cret:with-colon") == ("radiologist", "s3cret:with-colon")
    for bad in ("no-colon", ":password", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)


# -- the worklist and the study view (pure) ----------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>"
NOW = datetime(2026, 1, 2, 10, 30, tzinfo=UTC)


def session_task(name: str, minute: int = 0, **fields: object) -> SessionTask:
    return SessionTask(
        task_id=uuid.uuid4().hex,
        original_filename=name,
        submitted_at=NOW + timedelta(minutes=minute),
        **fields,
    )


def success(probability: float, *, uid: str = "1.2.3", positives: int = 1) -> StudyReport:
    findings = [
        FindingResult(
            label=label, probability=0.9 - index / 10, threshold=0.5, positive=index < positives
        )
        for index, label in enumerate(["Cancer", "Emphysema", "Lung nodule"])
    ]
    return StudyReport(
        path_to_study="x.zip",
        study_uid=uid,
        series_uid=uid + ".1",
        probability_of_pathology=probability,
        pathology=int(probability >= 0.5),
        processing_status=ProcessingStatus.SUCCESS,
        most_dangerous_pathology_type="Cancer" if positives else None,
        findings=findings,
        study_date="2007-04-25",
        study_description=HOSTILE,
        accession_number="A-17",
        demo_weights=True,
    )


def failure(reason: str, **fields: object) -> StudyReport:
    return StudyReport(
        path_to_study="x.zip",
        processing_status=ProcessingStatus.FAILURE,
        failure_reason=reason,
        **fields,
    )


def done(
    task: SessionTask, *reports: StudyReport, files: list[ResultFile] | None = None
) -> TaskView:
    result = StudyResult(
        task_id=task.duplicate_of or task.task_id,
        status=TaskStatus.COMPLETED,
        reports=list(reports),
        files=files or [],
        seconds=12.0,
    )
    return TaskView(task, TaskState.DONE, 1.0, "", result=result)


def test_every_study_gets_a_badge_failures_look_like_failures() -> None:
    head = session_task("head.zip")
    crashed = session_task("crashed.zip")
    task_views = [
        done(session_task("chest.zip"), success(0.81)),
        done(session_task("clear.zip"), success(0.12, uid="9.9", positives=0)),
        done(head, failure("not a chest CT: the images do not show lungs")),
        TaskView(
            crashed,
            TaskState.FAILED,
            1.0,
            "given up after 3 attempts",
            result=StudyResult(
                task_id=crashed.task_id,
                status=TaskStatus.FAILED,
                error="given up after 3 attempts",
                reports=[failure("given up after 3 attempts")],
            ),
        ),
        TaskView(
            session_task("busy.zip"),
            TaskState.PROCESSING,
            0.62,
            "running the model: about 9 s left",
        ),
        TaskView(
            session_task("later.zip"),
            TaskState.QUEUED,
            0.0,
            "",
            ahead=2,
            workers=2,
            expected_wait_s=40.0,
        ),
    ]
    worklist = views.worklist(task_views)
    rows = {row["file"]: row for row in worklist["rows"]}
    assert rows["chest.zip"]["badge_text"] == "PATHOLOGY"
    assert rows["chest.zip"]["finding"] == "Cancer"
    assert rows["clear.zip"]["badge_text"] == "NORMAL"
    assert rows["clear.zip"]["finding"] == ""
    for name in ("head.zip", "crashed.zip"):
        assert rows[name]["badge"] == "failure"
        assert rows[name]["badge_text"] == "Failure"
    assert rows["head.zip"]["status"] == "not a chest CT: the images do not show lungs"
    assert rows["crashed.zip"]["status"] == "given up after 3 attempts"
    assert rows["busy.zip"]["fraction"] == 0.62
    assert "about 9 s left" in rows["busy.zip"]["status"]
    assert rows["later.zip"]["status"] == "2 ahead in the queue, result in about 40 s"
    assert "done" not in {row["badge_text"].lower() for row in worklist["rows"]}
    # Most urgent first: PATHOLOGY, Failure (newest first), NORMAL, processing, queued.
    assert [row["badge"] for row in worklist["rows"]] == [
        "pathology",
        "failure",
        "failure",
        "normal",
        "processing",
        "queued",
    ]
    assert worklist["counts"] == {
        "pathology": 1,
        "failure": 2,
        "normal": 1,
        "processing": 1,
        "queued": 1,
    }
    assert views.summary_text(worklist["counts"]).startswith("1 PATHOLOGY · 2 Failure")
    # DICOM text is carried as it is (the page sets it as text); never turned into markup here.
    assert rows["chest.zip"]["description"] == HOSTILE


def test_pathology_rows_sort_by_probability_and_studies_of_one_upload_get_one_row_each() -> None:
    several = session_task("two studies.zip")
    task_views = [
        done(session_task("low.zip"), success(0.55)),
        done(several, success(0.97, uid="4.4"), failure("no CT series: modality MR")),
    ]
    rows = views.worklist(task_views)["rows"]
    assert [row["file"] for row in rows] == [
        "two studies.zip (study 1 of 2)",
        "low.zip",
        "two studies.zip (study 2 of 2)",
    ]
    assert views.parse_row_key(rows[2]["key"]) == (several.task_id, 1)
    assert views.parse_row_key("nonsense") is None
    assert views.parse_row_key(None) is None


def test_duplicates_and_other_uploads_of_one_study_are_flagged() -> None:
    original = session_task("chest.zip", minute=0, content_sha256="ab")
    again = session_task("chest.zip", minute=5, content_sha256="ab", duplicate_of=original.task_id)
    rezipped = session_task("chest-rezipped.zip", minute=7)
    task_views = [
        done(original, success(0.3, uid="1.2.3")),
        TaskView(
            again,
            TaskState.DONE,
            1.0,
            "",
            result=done(original, success(0.3)).result,
            duplicate_of=original,
        ),
        done(rezipped, success(0.3, uid="1.2.3")),
    ]
    rows = {row["task_id"]: row for row in views.worklist(task_views)["rows"]}
    assert rows[again.task_id]["flags"] == [
        "duplicate of chest.zip (uploaded 10:30): same file, result reused, not recomputed"
    ]
    assert rows[rezipped.task_id]["flags"] == [
        "same study (StudyInstanceUID) as chest.zip, other files"
    ]
    assert rows[original.task_id]["flags"] == [
        "same study (StudyInstanceUID) as chest-rezipped.zip, other files"
    ]


def test_queue_places_are_upper_bounds_and_the_wait_uses_seen_durations() -> None:
    # 5 waiting now; ours was queued behind 3; 1 task of ours came after it.
    assert tasks_ahead(queued_behind=3, waiting_now=5, known_later_waiting=1) == 3
    assert tasks_ahead(queued_behind=9, waiting_now=5, known_later_waiting=1) == 3
    assert tasks_ahead(queued_behind=None, waiting_now=0, known_later_waiting=0) == 0
    assert expected_wait_s(3, 2, 20.0) == 40.0  # rounds: 3 // 2 + 1
    assert expected_wait_s(3, 0, 20.0) is None
    assert expected_wait_s(3, 2, None) is None
    queued = [
        TaskView(
            session_task(f"q{index}.zip", minute=index, queued_behind=index),
            TaskState.QUEUED,
            0.0,
            "",
        )
        for index in range(3)
    ]
    placed = with_queue_places(queued, QueueStatus(waiting=2, workers=1), 30.0)
    assert [view.ahead for view in placed] == [0, 0, 1]  # two already left the queue
    # In the worklist the queue reads in its own order: the next one first.
    rows = views.worklist(placed)["rows"]
    assert [row["task_id"] for row in rows] == [view.task.task_id for view in placed]
    assert [view.expected_wait_s for view in placed] == [30.0, 30.0, 60.0]
    assert with_queue_places(queued, None, 30.0) == queued  # broker down: no guess
    assert views.queue_text(placed[0]) == "next in line, result in about 30 s"
    durations = StudyDurations()
    for task_id, seconds in (("a", 10.0), ("a", 99.0), ("b", 30.0), ("c", 0.0)):
        durations.add(task_id, seconds)
    assert durations.typical() == 20.0  # each task once, unfinished ones ignored


def test_the_queue_monitor_reads_the_broker_at_most_every_few_seconds() -> None:
    calls = []

    def read() -> QueueStatus:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("broker gone")
        return QueueStatus(waiting=4, workers=2)

    monitor = QueueMonitor(read, max_age_s=60.0)
    assert monitor.status() == QueueStatus(4, 2)
    assert monitor.status() == QueueStatus(4, 2)
    assert len(calls) == 1
    unreachable = QueueMonitor(lambda: (_ for _ in ()).throw(ConnectionError("down")), max_age_s=0)
    assert unreachable.status() is None


def test_the_study_view_reads_like_a_report(tmp_path: Path) -> None:
    task = session_task("chest.zip")
    report = success(0.81, positives=2).model_copy(
        update={
            "warnings": [
                "gantry tilt: the slices stack at 18.5 degrees to their normal",
                "a warning without numbers",
            ],
            "intake": IntakeSummary(files_total=3030, dicom_files=30, skipped_non_dicom=3000),
        }
    )
    files = [
        ResultFile(kind="viewer", path=f"results/{task.task_id}/viewer/study1.json"),
        ResultFile(kind="viewer", path=f"results/{task.task_id}/viewer/study1.bin"),
        ResultFile(kind="preview", path=f"results/{task.task_id}/previews/study1_axial_50.png"),
        ResultFile(kind="xlsx", path=f"results/{task.task_id}/output.xlsx"),
    ]
    documents = {files[0].path: {"data_file": "study1.bin", "shape": [2, 3, 4]}}
    view = study_view(
        done(task, report, files=files),
        0,
        file_url=lambda path: "file=" + path,
        read_json=documents.get,
    )
    assert view["call"] == "PATHOLOGY: P(pathology) 0.810; most dangerous finding: Cancer"
    assert [finding["label"] for finding in view["findings"]][:2] == ["Cancer", "Emphysema"]
    assert [finding["positive"] for finding in view["findings"]] == [True, True, False]
    assert view["warnings"][0] == {
        "headline": "gantry tilt",
        "detail": "the slices stack at 18.5 degrees to their normal",
    }
    assert view["warnings"][1] == {"headline": "a warning without numbers", "detail": ""}
    # 3,000 skipped files are said, never "Warnings: none".
    assert view["notes"] == ["3,000 file(s) in the upload were not DICOM and were skipped"]
    assert view["viewer"] == {
        "data_file": "study1.bin",
        "shape": [2, 3, 4],
        "url": f"file=results/{task.task_id}/viewer/study1.bin",
    }
    assert view["previews"] == [
        {
            "url": f"file=results/{task.task_id}/previews/study1_axial_50.png",
            "caption": "axial at 50%",
        }
    ]
    assert view["downloads"][0]["kind"] == "xlsx"
    assert ["description", HOSTILE] in view["identity"]
    assert view["demo"] is True

    refused = study_view(
        done(session_task("mr.zip"), failure("no CT series: modality MR")),
        0,
        file_url=lambda path: None,
        read_json=lambda path: None,
    )
    assert refused["badge_text"] == "Failure"
    assert refused["call"] == "Failure: no CT series: modality MR"
    assert refused["viewer"] is None
    assert "could be read as a volume" in refused["viewer_missing"]


def test_upload_messages_are_text_not_markup() -> None:
    assert views.markdown_text("<b>x</b> [a](b).zip") == (
        "&lt;b&gt;x&lt;/b&gt; \\[a\\]\\(b\\)\\.zip"
    )


def test_the_same_bytes_are_the_same_upload(tmp_path: Path) -> None:
    first, second, third = (tmp_path / name for name in ("a.dcm", "b.dcm", "c.dcm"))
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    third.write_bytes(b"one")
    assert content_sha256([first, second]) == content_sha256([second, first])
    assert content_sha256([first]) == content_sha256([third])
    assert content_sha256([first]) != content_sha256([second])


def test_sessions_forget_a_removed_task(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    token = FrontendService.new_session_token()
    tasks = [session_task("a.zip"), session_task("b.zip")]
    store.append(token, tasks)
    assert store.remove(token, tasks[0].task_id)
    assert [task.task_id for task in store.read(token).tasks] == [tasks[1].task_id]
    assert not store.remove(token, tasks[0].task_id)


def test_a_long_reason_keeps_its_words_in_the_row_and_its_numbers_in_the_tooltip() -> None:
    reason = (
        "not a chest CT: the images do not show lungs across the series (lungs on 6 of 37 "
        "evaluated slices (16%, 24 mm), about 42 ml of lung (a chest needs 30% of slices))"
    )
    row = views.worklist([done(session_task("head.zip"), failure(reason))])["rows"][0]
    assert row["status"] == "not a chest CT: the images do not show lungs across the series"
    assert row["detail"] == reason
    assert views.short_reason("no CT series: modality MR") == "no CT series: modality MR"

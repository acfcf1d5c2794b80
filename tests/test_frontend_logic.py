"""The frontend's pure helpers (tests/test_frontend.py drives the service with the real broker)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.broker.schemas import QueueTopology, ResultFile, StudyResult, TaskStatus
from services.core.schemas import (
    FailureKind,
    FindingResult,
    IntakeSummary,
    ProcessingStatus,
    StudyReport,
)
from services.frontend import views, worklist_rows
from services.frontend.download_names import download_name
from services.frontend.queue_status import (
    QueueMonitor,
    QueuePlace,
    QueueStatus,
    queue_places,
)
from services.frontend.service import frontend_instance_id
from services.frontend.sessions import is_session_token, new_session_token
from services.frontend.study_view import study_view
from services.frontend.uploads import content_sha256, safe_file_name
from services.frontend.wait_estimate import Pending, Where
from services.registry import Door, StudyRecord, StudyState
from services.registry.models import Study
from services.registry.reads import to_record
from services.registry.records import Priority, StageTimes
from services.registry.writes import apply_report


def listed(records: list[StudyRecord], places: dict[str, QueuePlace] | None = None) -> dict:
    """The worklist as the page receives it (the typed model, dumped to JSON values)."""
    return worklist_rows.worklist(records, places).model_dump(mode="json")


def test_file_names_and_ids_are_safe() -> None:
    assert safe_file_name("../../etc/passwd") == "passwd"
    assert safe_file_name("C:\\studies\\Ivanov Ivan.zip") == "Ivanov_Ivan.zip"
    assert safe_file_name("...") == "upload"
    identifier = frontend_instance_id("127.0.0.1", 7860)
    assert identifier.endswith("-7860")
    QueueTopology().reply_queue(identifier)  # a valid queue name part
    assert is_session_token(new_session_token())
    assert not is_session_token("../sessions/x")


# -- the worklist and the study view (pure) ----------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>"
NOW = datetime(2026, 1, 2, 10, 30, tzinfo=UTC)


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


def record(
    name: str,
    report: StudyReport | None = None,
    *,
    state: StudyState = StudyState.DONE,
    minute: int = 0,
    index: int = 0,
    task_id: str | None = None,
    progress: float = 0.0,
    stage: str | None = None,
) -> StudyRecord:
    """A registry row, through the registry's own mapping of a report onto a row."""
    row = Study(
        id=minute * 10 + index + 1,
        task_id=task_id or uuid.uuid4().hex,
        report_index=index,
        door=Door.UPLOAD.value,
        priority="routine",
        original_filename=name,
        study_path="",
        state=state.value,
        stage=stage,
        progress=progress,
        received_at=NOW + timedelta(minutes=minute),
        updated_at=NOW,
        findings=[],
        warnings=[],
        files=[],
    )
    if report is not None:
        apply_report(row, report)
    return to_record(row)


def result_of(first: StudyRecord, *reports: StudyReport, files: list[ResultFile] | None = None):
    return StudyResult(
        task_id=first.task_id,
        status=TaskStatus.COMPLETED,
        reports=list(reports),
        files=files or [],
        seconds=12.0,
    )


def test_every_study_gets_a_badge_failures_look_like_failures() -> None:
    records = [
        record("chest.zip", success(0.81)),
        record("clear.zip", success(0.12, uid="9.9", positives=0)),
        record(
            "head.zip",
            failure(
                "not a chest CT: the images do not show lungs",
                failure_kind=FailureKind.NOT_ANALYSED,
            ),
        ),
        record(
            "crashed.zip", failure("given up after 3 attempts"), state=StudyState.FAILED, minute=1
        ),
        record("busy.zip", state=StudyState.PROCESSING, progress=0.62, stage="inference"),
        record("later.zip", state=StudyState.QUEUED, task_id="later"),
    ]
    places = {"later": QueuePlace(ahead=2, workers=2, expected_wait_s=40.0)}
    worklist = listed(records, places)
    rows = {row["file"]: row for row in worklist["rows"]}
    assert rows["chest.zip"]["badge_text"] == "PATHOLOGY"
    assert rows["chest.zip"]["finding"] == "Cancer"
    assert rows["clear.zip"]["badge_text"] == "NORMAL"
    assert rows["clear.zip"]["finding"] == ""
    # Out of scope is grey "Not analysed"; an error is red "Failed".
    assert (rows["head.zip"]["badge"], rows["head.zip"]["badge_text"]) == (
        "not_analysed",
        "Not analysed",
    )
    assert (rows["crashed.zip"]["badge"], rows["crashed.zip"]["badge_text"]) == (
        "failed",
        "Failed",
    )
    assert rows["head.zip"]["status"] == "not a chest CT: the images do not show lungs"
    assert rows["crashed.zip"]["status"] == "given up after 3 attempts"
    assert rows["busy.zip"]["fraction"] == 0.62
    assert rows["busy.zip"]["status"] == "inference (62%)"
    assert rows["later.zip"]["status"] == "2 ahead in the queue, result in about 40 s"
    assert "done" not in {row["badge_text"].lower() for row in worklist["rows"]}
    # Triage order: unreviewed PATHOLOGY, unreviewed NORMAL, Failed, in flight (processing
    # before queued), Not analysed.
    assert [row["badge"] for row in worklist["rows"]] == [
        "pathology",
        "normal",
        "failed",
        "processing",
        "queued",
        "not_analysed",
    ]
    assert worklist["counts"] == {
        "pathology": 1,
        "normal": 1,
        "failed": 1,
        "not_analysed": 1,
        "processing": 1,
        "queued": 1,
    }
    assert worklist["unreviewed_pathology"] == 1
    assert worklist_rows.summary_text(worklist["counts"]).startswith("1 PATHOLOGY · 1 NORMAL")
    # DICOM text is carried as it is (the page sets it as text); never turned into markup here.
    assert rows["chest.zip"]["description"] == HOSTILE


def test_pathology_rows_sort_by_probability_and_studies_of_one_upload_get_one_row_each() -> None:
    task = uuid.uuid4().hex
    records = [
        record("low.zip", success(0.55)),
        record("two studies.zip", success(0.97, uid="4.4"), task_id=task),
        record("two studies.zip", failure("no CT series: modality MR"), task_id=task, index=1),
    ]
    rows = listed(records)["rows"]
    assert [row["file"] for row in rows] == [
        "two studies.zip (study 1 of 2)",
        "low.zip",
        "two studies.zip (study 2 of 2)",  # Failed: after the calls
    ]
    assert views.parse_row_key(rows[2]["key"]) == (task, 1)
    assert views.parse_row_key("nonsense") is None
    assert views.parse_row_key(None) is None


def test_other_uploads_of_one_study_are_flagged() -> None:
    records = [
        record("chest.zip", success(0.3, uid="1.2.3")),
        record("chest-rezipped.zip", success(0.3, uid="1.2.3"), minute=7),
        record("other.zip", success(0.3, uid="7.7.7"), minute=8),
    ]
    rows = {row["file"]: row for row in listed(records)["rows"]}
    assert rows["chest-rezipped.zip"]["flags"] == [
        "same study (StudyInstanceUID) as chest.zip, other files"
    ]
    assert rows["chest.zip"]["flags"] == [
        "same study (StudyInstanceUID) as chest-rezipped.zip, other files"
    ]
    assert rows["other.zip"]["flags"] == []


def test_queue_places_follow_the_lanes_order_and_the_wait_the_measured_stage_times() -> None:
    times = StageTimes(prepare_s=5.0, model_s=30.0, samples=3)
    tasks = [Pending(task, Priority.ROUTINE, Where.QUEUED) for task in "abc"]
    places = queue_places(tasks, QueueStatus(waiting=3, workers=1), times)
    assert [places[task].ahead for task in "abc"] == [0, 1, 2]
    assert [places[task].expected_wait_s for task in "abc"] == [35.0, 65.0, 95.0]
    assert queue_places(tasks, None, times) == {}  # broker down: no guess
    assert views.queue_text(places["a"]) == "next in line, result in about 35 s"
    assert views.queue_text(None) == "waiting for a free worker"
    queued = [
        record(f"q{index}.zip", state=StudyState.QUEUED, minute=index, task_id=f"q{index}")
        for index in range(3)
    ]
    order = [Pending(f"q{index}", Priority.ROUTINE, Where.QUEUED) for index in range(3)]
    rows = listed(queued, queue_places(order, QueueStatus(3, 1), times))
    # In the worklist the queue reads in its own order: the next one first.
    assert [row["task_id"] for row in rows["rows"]] == ["q0", "q1", "q2"]


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
    report = success(0.81, positives=2).model_copy(
        update={
            "warnings": [
                "gantry tilt: the slices stack at 18.5 degrees to their normal",
                "a warning without numbers",
            ],
            "intake": IntakeSummary(files_total=3030, dicom_files=30, skipped_non_dicom=3000),
        }
    )
    row = record("chest.zip", report)
    task = row.task_id
    files = [
        ResultFile(kind="viewer", path=f"results/{task}/viewer/study1.json"),
        ResultFile(kind="viewer", path=f"results/{task}/viewer/study1.bin"),
        ResultFile(kind="preview", path=f"results/{task}/previews/study1_axial_50.png"),
        ResultFile(kind="xlsx", path=f"results/{task}/output.xlsx"),
    ]
    documents = {files[0].path: {"data_file": "study1.bin", "shape": [2, 3, 4]}}
    earlier = record("before.zip", success(0.2, positives=0), minute=-600)
    view = study_view(
        row,
        result_of(row, report, files=files),
        n_studies=1,
        place=None,
        patient_studies=[row, earlier],
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
        "url": f"file=results/{task}/viewer/study1.bin",
    }
    assert view["previews"] == [
        {"url": f"file=results/{task}/previews/study1_axial_50.png", "caption": "axial at 50%"}
    ]
    assert view["downloads"][0]["kind"] == "xlsx"
    # Named by the study date, accession and task, as the file route's header names it.
    assert view["downloads"][0]["name"] == download_name([row], "output.xlsx")
    assert view["downloads"][0]["name"].endswith(f"_task-{task[:8]}_report.xlsx")
    assert ["description", HOSTILE] in view["identity"]
    assert ["received by", "the web page"] in view["identity"]
    assert view["demo"] is True
    # The patient's other studies: this one left out, each with its date and call.
    assert [(other["key"], other["badge_text"]) for other in view["patient_studies"]] == [
        (earlier.key, "NORMAL")
    ]

    mr = failure("no CT series: modality MR", failure_kind=FailureKind.NOT_ANALYSED)
    refused_row = record("mr.zip", mr)
    refused = study_view(
        refused_row,
        result_of(refused_row, mr),
        n_studies=1,
        place=None,
        patient_studies=[],
        file_url=lambda path: None,
        read_json=lambda path: None,
    )
    assert refused["badge_text"] == "Not analysed"
    assert refused["call"] == "Not analysed: no CT series: modality MR"
    assert refused["viewer"] is None
    assert "could be read as a volume" in refused["viewer_missing"]


def test_download_names_carry_date_and_task_never_identity() -> None:
    row = record("Doe^Jane CT.zip", success(0.8, positives=1))
    dated = row.model_copy(
        update={"study_date": '2007-04-25"\r\n', "accession_number": "ACC-SECRET-7"}
    )
    task = row.task_id[:8]
    assert download_name([dated], "output.xlsx") == f"chest-ct_2007-04-25_task-{task}_report.xlsx"
    assert download_name([dated], "warnings_and_errors.txt").endswith("_warnings.txt")
    assert download_name([dated], "study1_sr.dcm").endswith(f"_task-{task}_study1_sr.dcm")
    # Neither the file name the sender gave (it may name the patient) nor the accession
    # number (blanked with the identity by a purge, which cannot reach a Downloads folder).
    for kept_out in ("Doe", "ACC", "SECRET"):
        assert kept_out not in download_name([dated], "output.xlsx")
    # Two studies of a task on different dates: the task alone names their files.
    other = dated.model_copy(update={"report_index": 1, "study_date": "2008-01-02"})
    assert download_name([dated, other], "output.xlsx") == f"chest-ct_task-{task}_report.xlsx"


def test_upload_messages_are_text_not_markup() -> None:
    assert views.markdown_text("<b>x</b> [a](b).zip") == (
        "&lt;b&gt;x&lt;/b&gt; \\[a\\]\\(b\\)\\.zip"
    )
    # Quotes stay quotes: an entity such as &#x27; would show as text once its "#" is escaped.
    assert views.markdown_text("Ivanov's <1>.zip") == "Ivanov's &lt;1&gt;\\.zip"


def test_the_same_bytes_are_the_same_upload(tmp_path: Path) -> None:
    first, second, third = (tmp_path / name for name in ("a.dcm", "b.dcm", "c.dcm"))
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    third.write_bytes(b"one")
    assert content_sha256([first, second]) == content_sha256([second, first])
    assert content_sha256([first]) == content_sha256([third])
    assert content_sha256([first]) != content_sha256([second])


def test_a_long_reason_keeps_its_words_in_the_row_and_its_numbers_in_the_tooltip() -> None:
    reason = (
        "not a chest CT: the images do not show lungs across the series (lungs on 6 of 37 "
        "evaluated slices (16%, 24 mm), about 42 ml of lung (a chest needs 30% of slices))"
    )
    row = listed([record("head.zip", failure(reason))])["rows"][0]
    assert row["status"] == "not a chest CT: the images do not show lungs across the series"
    assert row["detail"] == reason
    assert views.short_reason("no CT series: modality MR") == "no CT series: modality MR"

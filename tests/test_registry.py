"""The study registry on SQLite and on the real PostgreSQL: migrations and the schema check,
exactly-once writes, listings with filters and cursors, a patient's studies, hiding,
importing a storage root and retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from registry_support import (
    BACKEND_PARAMETERS,
    open_registry,
    registry_url,
    sqlite_url,
    task_submission,
)
from sqlalchemy import text

from services.broker.schemas import Priority as BrokerPriority
from services.broker.schemas import StudyProgress, StudyResult, TaskStatus
from services.broker.storage import store_result
from services.core.config import PROJECT_ROOT, DimseDestination, Settings, load_settings
from services.core.schemas import FindingResult, PatientIdentity, ProcessingStatus, StudyReport
from services.dicom_listener.outbox import Outbox
from services.registry import (
    Door,
    Registry,
    RegistrySchemaError,
    Review,
    StudyFilter,
    StudyState,
    Submission,
)
from services.registry.audit import ActorKind, AuditAction, AuditQuery
from services.registry.database import alembic_config, create_registry_engine
from services.registry.records import Delivery, Priority, StageTimes
from services.registry.retention import BLANKED

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


PARAMETERS = BACKEND_PARAMETERS


@pytest.fixture(params=PARAMETERS)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    with open_registry(request.param, tmp_path) as opened:
        yield opened


def submission(task_id: str, *, at: datetime = T0, door: Door = Door.UPLOAD, **kw) -> Submission:
    return task_submission(task_id, at=at, door=door, **kw)


def report(
    *,
    pathology: int | None = 1,
    patient_id: str | None = "P-1",
    study_uid: str | None = "1.2.3",
    failure: str | None = None,
    study_date: str | None = "2026-02-28",
    name: str = "Doe^Jane",
) -> StudyReport:
    return StudyReport(
        path_to_study="study.zip",
        study_uid=study_uid,
        series_uid="1.2.3.4",
        probability_of_pathology=None if failure else 0.81,
        pathology=None if failure else pathology,
        processing_status=ProcessingStatus.FAILURE if failure else ProcessingStatus.SUCCESS,
        failure_reason=failure,
        most_dangerous_pathology_type=None if failure else "Lung nodule",
        findings=[
            FindingResult(label="Lung nodule", probability=0.7, threshold=0.5, positive=True),
            FindingResult(label="Emphysema", probability=0.1, threshold=0.5, positive=False),
        ],
        study_date=study_date,
        accession_number="ACC-9",
        study_description="CT chest",
        identity=PatientIdentity(patient_name=name, patient_id=patient_id, patient_sex="F"),
        demo_weights=True,
    )


def result(task_id: str, *reports: StudyReport, status: TaskStatus = TaskStatus.COMPLETED):
    return StudyResult(
        task_id=task_id,
        status=status,
        reports=list(reports) or [report()],
        original_filename=f"{task_id}.zip",
        study_path=f"uploads/{task_id}/{task_id}.zip",
        adapter_id="adapter-1",
        started_at=T0 + timedelta(seconds=5),
        finished_at=T0 + timedelta(seconds=30),
        seconds=25.0,
    )


def progress(task_id: str, stage: str, fraction: float) -> StudyProgress:
    return StudyProgress(
        task_id=task_id, stage=stage, fraction=fraction, adapter_id="adapter-1", at=T0
    )


def test_a_task_goes_from_queued_to_its_result_once(registry: Registry) -> None:
    assert registry.record_submission(submission("t1"))
    assert not registry.record_submission(submission("t1"))  # a door that retries
    first = registry.study("t1")
    assert first is not None
    assert first.state is StudyState.QUEUED
    assert registry.record_progress(progress("t1", "inference", 0.5))
    running = registry.study("t1")
    assert running is not None
    assert (running.state, running.stage, running.progress) == (
        StudyState.PROCESSING,
        "inference",
        0.5,
    )
    assert registry.record_result(result("t1"))
    done = registry.study("t1")
    assert done is not None
    assert done.state is StudyState.DONE
    assert done.pathology is True
    assert done.findings == ["Lung nodule"]
    assert done.identity is not None
    assert done.identity.patient_name == "Doe^Jane"
    assert done.door is Door.UPLOAD
    assert done.finished_at == T0 + timedelta(seconds=30)
    # RabbitMQ redelivers: nothing changes, nothing is added; late progress does not regress.
    assert not registry.record_result(result("t1", report(pathology=0)))
    assert not registry.record_progress(progress("t1", "inference", 0.9))
    again = registry.study("t1")
    assert again == done
    assert len(registry.task_studies("t1")) == 1


def test_the_unfinished_tasks_and_the_measured_stage_times(registry: Registry) -> None:
    """What the expected waits are computed from (services/frontend/wait_estimate.py)."""
    assert registry.stage_times() == StageTimes()  # nothing measured yet
    for index, (prepare, model) in enumerate([(4.0, 30.0), (6.0, 50.0), (2.0, None)]):
        task_id = f"done{index}"
        registry.record_submission(submission(task_id))
        measured = result(task_id).model_copy(
            update={"prepare_seconds": prepare, "model_seconds": model}
        )
        registry.record_result(measured)
    registry.record_result(result("from-before"))  # an older result, without stage times
    times = registry.stage_times()
    assert (times.prepare_s, times.model_s, times.samples) == (5.0, 40.0, 3)
    assert times.model_share == 2 / 3  # the third was refused in its preparation
    registry.record_submission(submission("later", at=T0 + timedelta(seconds=2)))
    registry.record_submission(
        submission("stat", at=T0 + timedelta(seconds=3), priority=Priority.STAT)
    )
    registry.record_submission(submission("first", at=T0 + timedelta(seconds=1)))
    registry.record_progress(progress("first", "reading", 0.1))
    pending = registry.pipeline_tasks()
    assert [(task.task_id, task.state, task.priority) for task in pending] == [
        ("first", StudyState.PROCESSING, Priority.ROUTINE),
        ("later", StudyState.QUEUED, Priority.ROUTINE),
        ("stat", StudyState.QUEUED, Priority.STAT),
    ]
    assert pending[0].stage == "reading"
    assert pending[0].started_at == T0


def test_a_task_of_several_studies_has_a_row_each(registry: Registry) -> None:
    registry.record_submission(submission("multi", sender="jdoe"))
    registry.record_result(
        result("multi", report(study_uid="1.1"), report(study_uid="1.2", failure="not a chest CT"))
    )
    rows = registry.task_studies("multi")
    assert [(row.report_index, row.study_instance_uid) for row in rows] == [(0, "1.1"), (1, "1.2")]
    assert rows[1].failure_reason == "not a chest CT"
    assert rows[1].sender == "jdoe"  # the task's submission carries over
    assert rows[1].door is Door.UPLOAD


def test_a_task_no_door_recorded_is_registered_from_what_the_adapter_says(
    registry: Registry,
) -> None:
    # Its lane comes with its progress (StudyProgress.priority).
    started = progress("amqp-task", "started", 0.0).model_copy(
        update={"priority": BrokerPriority.URGENT}
    )
    registry.record_progress(started)
    registry.record_result(result("amqp-task"))
    row = registry.study("amqp-task")
    assert row is not None
    assert row.door is Door.AMQP
    assert row.priority is Priority.URGENT
    assert row.original_filename == "amqp-task.zip"
    assert row.state is StudyState.DONE


def test_a_failed_task_is_failed(registry: Registry) -> None:
    registry.record_submission(submission("crash"))
    registry.record_result(
        result("crash", report(failure="given up after 3 attempts"), status=TaskStatus.FAILED)
    )
    row = registry.study("crash")
    assert row is not None
    assert row.state is StudyState.FAILED


def test_concurrent_recorders_write_one_result(registry: Registry) -> None:
    """Two writers of the same result at once (a redelivery racing the first delivery)."""
    registry.record_submission(submission("race"))
    outcome = result("race", report(study_uid="2.1"), report(study_uid="2.2"))
    answers: list[bool] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            answers.append(registry.record_result(outcome))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(answers) == [False, False, False, True]
    assert len(registry.task_studies("race")) == 2


def test_listing_filters_and_pages_newest_first(registry: Registry) -> None:
    for number in range(7):
        task = f"task{number}"
        door = Door.DICOM if number % 2 else Door.REST
        registry.record_submission(submission(task, at=T0 + timedelta(hours=number), door=door))
        if number < 5:
            registry.record_result(
                result(task, report(patient_id=f"P-{number % 3}", name=f"Name{number}^X"))
            )
    everything = StudyFilter()
    first = registry.list_studies(everything, limit=3)
    assert [row.task_id for row in first.items] == ["task6", "task5", "task4"]
    assert first.next is not None
    second = registry.list_studies(everything, limit=3, cursor=first.next)
    assert [row.task_id for row in second.items] == ["task3", "task2", "task1"]
    last = registry.list_studies(everything, limit=3, cursor=second.next)
    assert [row.task_id for row in last.items] == ["task0"]
    assert last.next is None
    queued = registry.list_studies(StudyFilter(states=[StudyState.QUEUED]))
    assert {row.task_id for row in queued.items} == {"task5", "task6"}
    dicom = registry.list_studies(StudyFilter(doors=[Door.DICOM]))
    assert {row.task_id for row in dicom.items} == {"task1", "task3", "task5"}
    patient = registry.list_studies(StudyFilter(patient_id="P-1"))
    assert {row.task_id for row in patient.items} == {"task1", "task4"}
    named = registry.list_studies(StudyFilter(text="name3"))  # any case, part of a name
    assert [row.task_id for row in named.items] == ["task3"]
    wildcard = registry.list_studies(StudyFilter(text="%"))  # taken literally
    assert wildcard.items == []
    day = registry.list_studies(
        StudyFilter(received_from=date(2026, 3, 1), received_to=date(2026, 3, 1))
    )
    assert len(day.items) == 7
    assert registry.list_studies(StudyFilter(received_from=date(2026, 3, 2))).items == []


def test_pages_by_cursor_cross_rows_received_at_the_same_time(registry: Registry) -> None:
    """A task's studies share their received time (and so may tasks): the cursor goes on by
    id within one time, and every row comes exactly once, newest first."""
    for number in range(3):
        registry.record_submission(submission(f"early{number}", at=T0))
    registry.record_submission(submission("multi", at=T0 + timedelta(hours=1)))
    registry.record_result(result("multi", *(report(study_uid=f"9.{n}") for n in range(4))))
    registry.record_submission(submission("late", at=T0 + timedelta(hours=2)))
    expected = [row.key for row in registry.list_studies(StudyFilter(), limit=500).items]
    assert expected[0] == "late:0"
    assert expected[-3:] == ["early2:0", "early1:0", "early0:0"]  # same time: newest id first
    seen: list[str] = []
    cursor = None
    while True:
        page = registry.list_studies(StudyFilter(), limit=2, cursor=cursor)
        seen += [row.key for row in page.items]
        if page.next is None:
            break
        cursor = page.next
    assert seen == expected
    assert len(seen) == 8
    # A filtered listing pages the same way (the cursor and the filter together).
    rest = registry.list_studies(StudyFilter(task_id="multi"), limit=3)
    assert rest.next is not None
    last = registry.list_studies(StudyFilter(task_id="multi"), limit=3, cursor=rest.next)
    assert [row.report_index for row in rest.items + last.items] == [3, 2, 1, 0]


def test_a_patients_studies_and_hiding_for_one_viewer(registry: Registry) -> None:
    for number, day in enumerate(("2025-01-10", "2026-02-01", "2024-06-30")):
        task = f"p{number}"
        registry.record_submission(submission(task, at=T0 + timedelta(minutes=number)))
        registry.record_result(result(task, report(patient_id="PX", study_date=day)))
    registry.record_submission(submission("other"))
    registry.record_result(result("other", report(patient_id="PY")))
    studies = registry.patient_studies("PX", None)
    assert [row.study_date for row in studies] == ["2026-02-01", "2025-01-10", "2024-06-30"]
    target = registry.study("p1")
    assert target is not None
    assert registry.hide(target.id, "jdoe")
    assert not registry.hide(target.id, "jdoe")
    for_jdoe = registry.list_studies(StudyFilter(hidden_for="jdoe")).items
    for_other = registry.list_studies(StudyFilter(hidden_for="asmith")).items
    assert "p1" not in {row.task_id for row in for_jdoe}
    assert "p1" in {row.task_id for row in for_other}


def test_an_earlier_upload_of_the_same_bytes_is_found(registry: Registry) -> None:
    registry.record_submission(submission("first", content_sha256="ab" * 32))
    found = registry.earlier_upload("ab" * 32)
    assert found is not None
    assert found.task_id == "first"
    registry.record_result(
        result("first", report(failure="crash"), status=TaskStatus.FAILED)
    )  # a failed task is worth a second try
    assert registry.earlier_upload("ab" * 32) is None


@pytest.mark.parametrize("backend", PARAMETERS)
def test_a_service_refuses_a_schema_other_than_its_own(backend: str, tmp_path: Path) -> None:
    with registry_url(backend, tmp_path, upgraded=False) as url:
        with pytest.raises(RegistrySchemaError, match="no schema yet"):
            Registry(url)
        command.upgrade(alembic_config(url), "head")
        Registry(url).close()  # at head: opens
        engine = create_registry_engine(url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        engine.dispose()
        with pytest.raises(RegistrySchemaError, match="newer than this code"):
            Registry(url)


@pytest.mark.slow
@pytest.mark.parametrize("service", ["services.dicom_listener", "services.frontend"])
@pytest.mark.parametrize("backend", PARAMETERS)
def test_a_service_exits_2_saying_why_on_a_newer_schema(
    backend: str, service: str, tmp_path: Path
) -> None:
    """The DICOM listener and the frontend, started as a deployment starts them, on a database
    a newer version of the code has upgraded: exit status 2 and the reason in the log."""
    with registry_url(backend, tmp_path / "database") as url:
        engine = create_registry_engine(url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        engine.dispose()
        config = tmp_path / "config.yaml"
        config.write_text(
            f"storage: {{root: {tmp_path / 'storage'}}}\n"
            "metrics: {enabled: false}\n"
            f"registry: {{url: '{url.render_as_string(hide_password=False)}'}}\n"
        )
        environment = {
            key: value
            for key, value in os.environ.items()
            if key != "CTS_CONFIG" and not key.startswith("CTS__")
        }
        completed = subprocess.run(
            [sys.executable, "-m", service, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**environment, "PYTHONPATH": str(PROJECT_ROOT)},
            cwd=PROJECT_ROOT,
        )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "not started" in completed.stderr
    assert "has schema 9999, newer than this code" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("backend", PARAMETERS)
def test_the_migrations_go_down_and_up_again(backend: str, tmp_path: Path) -> None:
    with registry_url(backend, tmp_path, upgraded=False) as url:
        config = alembic_config(url)
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        command.upgrade(config, "head")
        Registry(url).close()


@pytest.mark.parametrize("backend", PARAMETERS)
def test_a_review_s_call_reaches_the_rows_reviewed_before_0009(
    backend: str, tmp_path: Path
) -> None:
    """0009 puts the latest review's call on the study's row; rows reviewed before it take it
    from the reviews table."""
    with registry_url(backend, tmp_path) as url:
        opened = Registry(url)
        try:
            opened.record_submission(submission("seen"))
            opened.record_result(result("seen", report()))
            opened.record_review(Review(task_id="seen", reviewer="dr.a", agrees=True))
            corrected = Review(task_id="seen", reviewer="dr.b", agrees=False, pathology=False)
            opened.record_review(corrected)
        finally:
            opened.close()
        # Down to 0008 and up again: on SQLite the downgrade rebuilds `studies`, which must
        # not take the reviews and hidden rows with it (ON DELETE CASCADE).
        opened = Registry(url)
        try:
            seen = opened.study("seen")
            assert seen is not None
            assert opened.hide(seen.id, "dr.a")
        finally:
            opened.close()
        command.downgrade(alembic_config(url), "0008")
        engine = create_registry_engine(url)
        with engine.connect() as connection:
            kept = connection.execute(text("SELECT count(*) FROM reviews")).scalar_one()
            hidden = connection.execute(text("SELECT count(*) FROM hidden_studies")).scalar_one()
        engine.dispose()
        assert (kept, hidden) == (2, 1)
        command.upgrade(alembic_config(url), "head")
        opened = Registry(url)
        try:
            row = opened.study("seen")
        finally:
            opened.close()
    assert row is not None
    assert row.review is not None
    assert (row.review.reviewer, row.review.agrees, row.review.pathology) == ("dr.b", False, False)


def test_the_free_text_search_ignores_case_and_takes_wildcards_literally(
    registry: Registry,
) -> None:
    registry.record_submission(submission("a_task"))
    registry.record_result(result("a_task", report(name="McDonald^Ann", study_uid="1.2.840.99")))
    registry.record_submission(submission("other"))
    registry.record_result(result("other", report(name="Smith^Bob", study_uid="1.2.841.7")))

    def found(text: str) -> set[str]:
        return {row.task_id for row in registry.list_studies(StudyFilter(text=text)).items}

    assert found("mcdonald") == found("MCDONALD") == found("cDoNaLd^a") == {"a_task"}
    assert found("1.2.84") == {"a_task", "other"}  # a UID's beginning
    assert found("840.9") == {"a_task"}
    assert found("a_t") == {"a_task"}  # the file name a_task.zip, _ not a wildcard
    assert found("a%t") == set()
    assert found("ct chest") == {"a_task", "other"}  # the description, any case


@pytest.mark.postgres
def test_postgresql_plans_each_listing_for_its_own_parameters(tmp_path: Path) -> None:
    """No listing runs as a prepared statement: PostgreSQL plans a prepared statement, after
    a few runs, once for any parameters, and that plan would scan every row for a rare search
    term instead of using the trigram index (0002). psycopg prepares a query it has run five
    times but forgets them all at a rollback, and every read session ends in one."""
    with registry_url("postgresql", tmp_path) as url:
        opened = Registry(url)
        try:
            for _ in range(8):  # more than psycopg's prepare threshold (5)
                opened.list_studies(StudyFilter(text="A000123"), limit=50)
            with opened.reading() as session:
                prepared = session.scalar(text("SELECT count(*) FROM pg_prepared_statements"))
                indexes = set(
                    session.scalars(
                        text("SELECT indexname FROM pg_indexes WHERE tablename = 'studies'")
                    )
                )
        finally:
            opened.close()
    assert prepared == 0
    assert {"ix_studies_text", "ix_studies_received"} <= indexes


def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "registry")
    command.upgrade(alembic_config(url), "head")
    database = Path(url.database or "")
    assert database.stat().st_mode & 0o777 == 0o600
    assert database.parent.stat().st_mode & 0o777 == 0o700


def test_blanking_a_task_takes_its_uids_and_accession_everywhere(registry: Registry) -> None:
    """What a purge or a deletion does to the registry: the study rows lose the identity,
    the SRs' deliveries their SOP Instance UIDs, and a webhook's message the accession number
    it was to carry (the rest of the message stays)."""
    from functools import partial

    from services.core.config import NotificationSettings, Webhook
    from services.registry.webhooks import notifications_of

    webhooks = NotificationSettings(
        webhooks=[
            Webhook(url="https://ris.example/hook", secret="s", include_accession_number=True),  # type: ignore[arg-type]
            Webhook(url="https://chat.example/hook", secret="s"),  # type: ignore[arg-type]
        ]
    )
    registry.record_submission(submission("gone"))
    registry.record_result(result("gone"), partial(notifications_of, webhooks))
    registry.record_delivery(
        Delivery(
            task_id="gone",
            report_index=0,
            destination="PACS@127.0.0.1_104",
            sop_instance_uid="2.25.99",
            state="sent",
            updated_at=T0,
        )
    )
    before = {item.url: json.loads(item.body) for item in registry.outbox.of_task("gone")}
    assert before["https://ris.example/hook"]["accession_number"] == "ACC-9"
    registry.blank_task("gone", purged_name="(purged)", fields=BLANKED)
    row = registry.study("gone")
    assert row is not None
    assert (row.identity, row.accession_number, row.study_instance_uid) == (None, None, None)
    (delivery,) = registry.deliveries("gone")
    assert (delivery.state, delivery.sop_instance_uid) == ("sent", None)
    after = {item.url: json.loads(item.body) for item in registry.outbox.of_task("gone")}
    assert after["https://ris.example/hook"] == {
        **before["https://ris.example/hook"],
        "accession_number": None,
    }
    assert after["https://chat.example/hook"] == before["https://chat.example/hook"]


def settings_for(tmp_path: Path, **registry_options: object) -> Settings:
    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    for name, value in registry_options.items():
        setattr(settings.registry, name, value)
    return settings


def outbox_with_reports(root: Path, tmp_path: Path) -> list[Outbox]:
    """The DICOM listener's outboxes of two destinations holding SRs of both tasks (each
    copy carries the patient's name): old-task's first SR sent to the PACS (a note in sent/)
    and refused by the archive (failed/: the copy and a note), its second waiting for the
    archive; new-task's waiting for the PACS."""
    outboxes = [
        Outbox(root, DimseDestination(ae_title="PACS", host="127.0.0.1", port=104)),
        Outbox(root, DimseDestination(ae_title="ARCHIVE", host="127.0.0.1", port=11112)),
    ]
    pacs, archive = outboxes
    reports = tmp_path / "sr"
    reports.mkdir()
    for number in (1, 2):
        (reports / f"study_{number:04d}_0123456789ab.dcm").write_bytes(b"DICM Doe^Jane")
    first, second = sorted(reports.iterdir())
    for outbox in outboxes:
        assert outbox.enqueue("old-task", first)
    pacs.mark_sent(pacs.pending()[0], "0x0000")
    archive.mark_failed(archive.pending()[0], "refused")
    assert archive.enqueue("old-task", second)
    assert pacs.enqueue("new-task", first)
    return outboxes


def outbox_files(root: Path) -> list[str]:
    return sorted(
        str(path.relative_to(root / "dicom" / "outbox"))
        for path in (root / "dicom" / "outbox").rglob("*")
        if path.is_file()
    )


@pytest.mark.parametrize("backend", PARAMETERS)
def test_the_command_upgrades_imports_and_purges(backend: str, tmp_path: Path) -> None:
    """The SQLite file of the storage root by default, or the real PostgreSQL by its URL."""
    from services.registry.__main__ import main

    settings = settings_for(tmp_path, retention_days=30)
    root = settings.storage.root
    config = tmp_path / "config.yaml"
    with registry_url(backend, tmp_path / "database", upgraded=False) as url:
        database = "" if backend == "sqlite" else f"  url: {url.render_as_string(False)}\n"
        config.write_text(f"storage:\n  root: {root}\nregistry:\n  retention_days: 30\n{database}")
        purge_with_the_command(main, config, root, tmp_path)


def purge_with_the_command(main, config: Path, root: Path, tmp_path: Path) -> None:
    old, recent = result("old-task"), result("new-task")
    recent = recent.model_copy(update={"started_at": datetime.now(UTC)})
    for stored in (old, recent):
        store_result(root, stored)
        (root / "uploads" / stored.task_id).mkdir(parents=True)
        (root / "uploads" / stored.task_id / "x.dcm").write_bytes(b"DICM")
        (root / "results" / stored.task_id / "viewer").mkdir(parents=True)
    outboxes = outbox_with_reports(root, tmp_path)
    pacs, archive = (outbox.name for outbox in outboxes)
    in_outbox = outbox_files(root)
    sr = "study_0001_0123456789ab"
    assert in_outbox == sorted(
        [
            f"{pacs}/sent/old-task_{sr}.json",
            f"{archive}/failed/old-task_{sr}.dcm",
            f"{archive}/failed/old-task_{sr}.json",
            f"{archive}/old-task_study_0002_0123456789ab.dcm",
            f"{pacs}/new-task_{sr}.dcm",
        ]
    )
    assert main(["--config", str(config), "upgrade"]) == 0
    assert main(["--config", str(config), "import-storage"]) == 0
    assert main(["--config", str(config), "import-storage"]) == 0  # idempotent
    registry = Registry.open(load_settings(config, environ={}))
    try:
        assert [row.task_id for row in registry.list_studies(StudyFilter()).items] == [
            "new-task",
            "old-task",
        ]
        registry.record_delivery(
            Delivery(
                task_id="old-task",
                report_index=0,
                destination=pacs,
                sop_instance_uid="2.25.1234",
                state="sent",
                updated_at=T0,
            )
        )
        assert main(["--config", str(config), "purge", "--dry-run"]) == 0
        untouched = registry.study("old-task")
        assert untouched is not None
        assert untouched.identity is not None
        assert outbox_files(root) == in_outbox
        assert main(["--config", str(config), "purge"]) == 0
        purged = registry.study("old-task")
        kept = registry.study("new-task")
        trail = registry.audit.events(AuditQuery(actions=(AuditAction.PURGE,)))
        (delivery,) = registry.deliveries("old-task")
    finally:
        registry.close()
    # Every outbox item of the purged task is gone (the copies carried the patient's name);
    # the recent task's SR still waits for the PACS.
    assert outbox_files(root) == [f"{pacs}/new-task_{sr}.dcm"]
    assert (delivery.state, delivery.sop_instance_uid) == ("sent", None)
    assert [(entry.task_id, entry.actor_kind) for entry in trail] == [
        ("old-task", ActorKind.SYSTEM)
    ]
    assert purged is not None
    assert kept is not None
    assert purged.identity is None
    assert purged.accession_number is None
    assert purged.purged_at is not None
    assert purged.pathology is True  # the call stays for statistics
    assert purged.model_version == kept.model_version
    assert not (root / "uploads" / "old-task").exists()
    assert not (root / "results" / "old-task").exists()
    assert "Doe" not in (root / "results" / "old-task.json").read_text()
    assert (root / "uploads" / "new-task").exists()
    assert kept.identity is not None


def test_a_plain_postgresql_url_is_read_with_psycopg_3(tmp_path: Path) -> None:
    from services.registry.database import database_url

    settings = settings_for(tmp_path, url="postgresql://cts@db.example:5432/cts")
    assert database_url(settings).drivername == "postgresql+psycopg"
    settings.registry.url = None
    default = database_url(settings)
    assert default.drivername == "sqlite"
    assert default.database == str(settings.storage.root / "registry" / "registry.sqlite3")


@pytest.mark.postgres
def test_two_upgrades_at_once_run_one_after_the_other(tmp_path: Path) -> None:
    """Two pods' init containers on an empty database: both succeed, one schema."""
    import os
    import subprocess
    import sys

    with registry_url("postgresql", tmp_path, upgraded=False) as url:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CTS")}
        environment["CTS__REGISTRY__URL"] = url.render_as_string(hide_password=False)
        upgrades = [
            subprocess.Popen(
                [sys.executable, "-m", "services.registry", "upgrade"],
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        for upgrade in upgrades:
            output, _ = upgrade.communicate(timeout=120)
            assert upgrade.returncode == 0, output[-2000:]
        Registry(url).close()


@pytest.mark.rabbitmq
def test_the_recorder_runs_on_its_own_until_stopped(tmp_path: Path) -> None:
    """python -m services.registry record: what the adapters report reaches the registry;
    SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    import uuid

    from stack_support import delete_topology, wait_for

    from services.broker.connection import connect, declare_topology, publish_to_registry
    from services.broker.schemas import QueueTopology

    settings = settings_for(tmp_path)
    settings.rabbitmq.queue_prefix = f"test-recorder-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"storage: {{root: {settings.storage.root}}}\n"
        f"rabbitmq: {{queue_prefix: {settings.rabbitmq.queue_prefix}}}\n"
        "metrics: {enabled: false}\n"
    )
    from services.registry import upgrade_registry

    upgrade_registry(settings)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CTS")}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.registry", "--config", str(config), "record"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    registry = Registry.open(settings)
    try:
        topology = QueueTopology.from_settings(settings.rabbitmq)
        connection = connect(settings.rabbitmq, name="test publisher", give_up_after_s=10)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, topology)
            publish_to_registry(channel, topology, result("standalone"))
        finally:
            connection.close()
        wait_for(lambda: registry.study("standalone") is not None, 30, "the row recorded")
        record_ = registry.study("standalone")
        assert record_ is not None
        assert record_.state is StudyState.DONE
    finally:
        registry.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        delete_topology(settings.rabbitmq)
    assert process.returncode == 0, output[-2000:]
    assert "registry recorder stopped" in output


@pytest.mark.parametrize("backend", PARAMETERS)
def test_the_tables_are_what_the_migrations_make(backend: str, tmp_path: Path) -> None:
    """Alembic's autogenerate finds nothing to do: models.py and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.registry.models import Base

    def on_this_backend(item: object, _name: object, kind: str, *_rest: object) -> bool:
        # Indexes declared for one database only (ddl_if) exist on that one alone.
        condition = getattr(item, "_ddl_if", None)
        dialect = getattr(condition, "dialect", None)
        return kind != "index" or dialect is None or dialect == backend

    with registry_url(backend, tmp_path) as url:
        engine = create_registry_engine(url)
        try:
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection, opts={"include_object": on_this_backend}
                )
                differences = compare_metadata(context, Base.metadata)
        finally:
            engine.dispose()
    assert differences == []


def test_rows_from_before_the_outcome_get_theirs(tmp_path: Path) -> None:
    """Migration 0003 gives rows recorded before it their outcome."""
    url = sqlite_url(tmp_path)
    config = alembic_config(url)
    command.upgrade(config, "0002")
    engine = create_registry_engine(url)
    with engine.begin() as connection:
        for task, status, pathology in (
            ("a", "Success", True),
            ("b", "Success", False),
            ("c", "Failure", None),
        ):
            connection.execute(
                text(
                    "INSERT INTO studies (task_id, report_index, door, priority, original_filename, "
                    "study_path, state, progress, received_at, updated_at, findings, warnings, files, "
                    "processing_status, pathology) VALUES (:task, 0, 'upload', 'routine', '', '', "
                    "'done', 1.0, '2026-01-01 00:00:00', '2026-01-01 00:00:00', '[]', '[]', '[]', "
                    ":status, :pathology)"
                ),
                {"task": task, "status": status, "pathology": pathology},
            )
    engine.dispose()
    command.upgrade(config, "head")
    registry = Registry(url)
    try:
        rows = {task: registry.study(task) for task in "abc"}
        outcomes = {task: row.outcome if row else None for task, row in rows.items()}
    finally:
        registry.close()
    assert {task: outcome.value if outcome else None for task, outcome in outcomes.items()} == {
        "a": "pathology",
        "b": "normal",
        "c": "failed",
    }

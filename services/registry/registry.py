"""The one object the services use to reach the study registry.

    registry = Registry.open(settings)          # refuses a schema other than this code's
    registry.record_submission(Submission(...))  # a door, before it queues the task
    registry.record_result(result)               # the recorder, before it acks the message
    page = registry.list_studies(StudyFilter(hidden_for="jdoe"), limit=50)

Every write is one transaction, idempotent by task id (writes.py). On SQLite a write begins
IMMEDIATE (it takes the file's write lock before it reads, so two writers queue up instead of
one failing on a stale snapshot); a write that loses a race (IntegrityError) is run once more
and then finds the winner's rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.broker.schemas import StudyProgress, StudyResult
from services.core.config import Settings
from services.registry import outbox, reads, writes
from services.registry.account_book import AccountBook, AuditTrail
from services.registry.database import (
    check_schema,
    create_registry_engine,
    database_url,
    describe,
    session_factory,
)
from services.registry.outbox import NewNotification, WebhookOutbox
from services.registry.records import (
    Delivery,
    Door,
    PipelineTask,
    Review,
    StageTimes,
    StudyFilter,
    StudyPage,
    StudyRecord,
    Submission,
)

T = TypeVar("T")
WRITE_ATTEMPTS = 2  # a lost race, then the winner's rows are there


def utc_now() -> datetime:
    return datetime.now(UTC)


class Registry:
    def __init__(self, url: URL, *, timeout_s: float = 10.0, check: bool = True) -> None:
        self.url = url
        self._read_engine = create_registry_engine(url, timeout_s=timeout_s)
        self._write_engine = self._read_engine
        if url.get_backend_name() == "sqlite":
            self._write_engine = _immediate_writes(create_registry_engine(url, timeout_s=timeout_s))
        self._reads = session_factory(self._read_engine)
        self._writes = session_factory(self._write_engine)
        if check:
            check_schema(self._read_engine)
        self.accounts = AccountBook(self._write, self.reading)
        self.audit = AuditTrail(self._write, self.reading)
        self.outbox = WebhookOutbox(self._write, self.reading)

    @classmethod
    def open(cls, settings: Settings, *, check: bool = True) -> Registry:
        return cls(database_url(settings), timeout_s=settings.registry.timeout_s, check=check)

    def describe(self) -> str:
        return describe(self.url)

    def close(self) -> None:
        self._read_engine.dispose()
        self._write_engine.dispose()

    # -- writes ------------------------------------------------------------------------------

    def _write(self, change: Callable[[Session, datetime], T]) -> T:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._writes.begin() as session:
                    return change(session, utc_now())
            except IntegrityError:
                if attempt == WRITE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def record_submission(self, submission: Submission) -> bool:
        return self._write(lambda session, now: writes.record_submission(session, submission, now))

    def record_progress(self, progress: StudyProgress) -> bool:
        return self._write(lambda session, now: writes.record_progress(session, progress, now))

    def record_result(
        self,
        result: StudyResult,
        notifications: Callable[[StudyResult], list[NewNotification]] | None = None,
    ) -> bool:
        """True when this is the task's first result; then ``notifications`` (the webhooks'
        messages of it) join the outbox in the same transaction."""

        def change(session: Session, now: datetime) -> bool:
            first = writes.record_result(session, result, now)
            if first and notifications is not None:
                outbox.add(session, notifications(result), now)
            return first

        return self._write(change)

    def hide(self, study_id: int, viewer: str) -> bool:
        return self._write(lambda session, now: writes.hide(session, study_id, viewer, now))

    def unhide(self, study_id: int, viewer: str) -> bool:
        return self._write(lambda session, _now: writes.unhide(session, study_id, viewer))

    def record_review(self, review: Review) -> bool:
        """False when the study is unknown or has no result yet."""
        return self._write(lambda session, now: writes.record_review(session, review, now))

    def record_delivery(self, delivery: Delivery) -> None:
        self._write(lambda session, _now: writes.record_delivery(session, delivery))

    def blank_task(self, task_id: str, *, purged_name: str, fields: tuple[str, ...]) -> None:
        self._write(
            lambda session, now: writes.blank_task(
                session, task_id, purged_name=purged_name, fields=fields, now=now
            )
        )

    # -- reads -------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for a question the registry's own modules ask (retention, benchmarks)."""
        with self._reads() as session:
            yield session

    def list_studies(
        self, wanted: StudyFilter, *, limit: int = 50, cursor: str | None = None
    ) -> StudyPage:
        with self.reading() as session:
            return reads.list_studies(session, wanted, limit=limit, cursor=cursor)

    def study(self, task_id: str, report_index: int = 0) -> StudyRecord | None:
        with self.reading() as session:
            return reads.study(session, task_id, report_index)

    def task_studies(self, task_id: str) -> list[StudyRecord]:
        with self.reading() as session:
            return reads.task_studies(session, task_id)

    def patient_studies(self, patient_id: str, issuer: str | None) -> list[StudyRecord]:
        with self.reading() as session:
            return reads.patient_studies(session, patient_id, issuer)

    def earlier_upload(self, content_sha256: str) -> StudyRecord | None:
        with self.reading() as session:
            return reads.earlier_upload(session, content_sha256)

    def pipeline_tasks(self) -> list[PipelineTask]:
        with self.reading() as session:
            return reads.pipeline_tasks(session)

    def stage_times(self) -> StageTimes:
        with self.reading() as session:
            return reads.stage_times(session)

    def tasks_without_delivery(
        self, *, doors: list[Door], destination: str, since: datetime, limit: int = 50
    ) -> list[str]:
        with self.reading() as session:
            return reads.tasks_without_delivery(
                session, doors=doors, destination=destination, since=since, limit=limit
            )

    def earlier_reports_with_sr(self, study_instance_uid: str) -> list[tuple[str, int]]:
        with self.reading() as session:
            return reads.earlier_reports_with_sr(session, study_instance_uid)

    def reviews(self, task_id: str, report_index: int = 0) -> list[Review]:
        with self.reading() as session:
            return reads.reviews(session, task_id, report_index)

    def deliveries(self, task_id: str) -> list[Delivery]:
        with self.reading() as session:
            return reads.deliveries(session, task_id)

    def ping(self) -> None:
        """Raises when the database cannot be reached (the recorder waits on it)."""
        with self._read_engine.connect() as connection:
            connection.execute(text("SELECT 1"))


def _immediate_writes(engine: Engine) -> Engine:
    """SQLite: every transaction of this engine begins IMMEDIATE (takes the write lock first)."""

    @event.listens_for(engine, "connect")
    def _manual_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite leaves BEGIN to us

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine

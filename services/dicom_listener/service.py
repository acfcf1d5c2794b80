"""The listener's moving parts together: the C-STORE receiver, the thread that closes quiet
studies and publishes their tasks, the thread that puts finished studies' SRs in the outbox,
and one sender per destination (with the ReportSink of its kind: DIMSE or STOW-RS).

Every study is recorded in the study registry (door ``dicom``, the calling AE title) before
its task is published, and a refused one (too large, no image) as a Failure with its reason.
Tasks are published without a reply queue: the listener reads each result from
``results/<task_id>.json``, which adapters store before they publish, so a result is never
missed, whether the listener was running when it came or not. Each SR's way to each
destination is recorded in the registry too (pending, sent, failed); with
``dicom.send_uploads_to_pacs`` the SRs of web and REST uploads go to the destinations as well.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from services.broker.connection import CONNECTION_ERRORS, submit_task
from services.broker.errors import PublishError
from services.broker.schemas import StudyTask, utc_now
from services.broker.storage import load_result
from services.core.config import Backoff, ReportDestination, Settings
from services.core.errors import ConfigurationError, WorkInterrupted
from services.core.retry import log_retry, retrying_until_stopped
from services.dicom_listener.door import check_door
from services.dicom_listener.door_audit import AUDIT_DIR, DoorAudit
from services.dicom_listener.export import ReportSender, create_sink
from services.dicom_listener.metrics import ListenerMetrics, listener_metrics
from services.dicom_listener.outbox import Outbox, destination_name
from services.dicom_listener.receiver import StoreReceiver
from services.dicom_listener.studies import DICOM_DIR, BatchRecord, BatchState, StudyBook
from services.dicom_listener.tls import listener_context
from services.dicom_listener.uploads_to_pacs import UploadsToPacs, report_position
from services.registry import Door, Registry, Submission
from services.registry.records import Delivery
from services.registry.records import Priority as RecordedPriority

TICK_S = 0.5  # how often quiet studies are closed and results looked for
SR_KIND = "sr"
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, PublishError)
REGISTRY_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError,)


def check_distinct_outboxes(destinations: Sequence[ReportDestination]) -> None:
    """Two destinations with one outbox folder would have two senders on the same files."""
    names = [destination_name(destination) for destination in destinations]
    shared = sorted({name for name in names if names.count(name) > 1})
    if shared:
        raise ConfigurationError(
            f"dicom.destinations lists the same destination more than once: {', '.join(shared)}"
        )


class DicomListener:
    """``start()``, then ``stop()``; ``port`` is the bound DICOM port."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: ListenerMetrics | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.storage_root = settings.storage.root
        dicom = settings.dicom
        # The door and the destinations first: a door open to the network without an
        # allow-list, a wrong destination (a missing secret, a folder shared by two) or a TLS
        # file that does not load stop the listener before it touches the storage; so does
        # a registry whose schema is not this code's.
        check_door(dicom)
        tls_context = listener_context(dicom.tls) if dicom.tls.enabled else None
        check_distinct_outboxes(dicom.destinations)
        sinks = [create_sink(destination, dicom) for destination in dicom.destinations]
        self.registry = registry or Registry.open(settings)
        self.metrics = metrics or listener_metrics()
        self.book = StudyBook(
            self.storage_root,
            quiet_s=dicom.study_quiet_seconds,
            max_bytes=dicom.max_study_mb * 1024 * 1024,
            priorities=dicom.calling_ae_priorities,
        )
        self.audit = DoorAudit(
            self.storage_root / DICOM_DIR / AUDIT_DIR,
            self.registry,
            settings.registry.unavailable_backoff,
            self.metrics,
        )
        self.receiver = StoreReceiver(
            dicom, self.book, self.metrics, self.audit.record, tls_context
        )
        self.outboxes = [
            Outbox(self.storage_root, destination) for destination in dicom.destinations
        ]
        self._stop = threading.Event()
        self.senders = [
            ReportSender(
                outbox,
                sink,
                settings=dicom,
                stop_event=self._stop,
                metrics=self.metrics,
                on_outcome=self._record_delivery,
            )
            for outbox, sink in zip(self.outboxes, sinks, strict=True)
        ]
        self.uploads = UploadsToPacs(self.storage_root, self.registry, self.outboxes)
        self._threads = [
            threading.Thread(target=self._close_and_publish, name="study-closer", daemon=True),
            threading.Thread(target=self._collect_results, name="result-collector", daemon=True),
        ]

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        self.audit.start()
        self.receiver.start()
        for thread in [*self._threads, *self.senders]:
            thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.receiver.stop()
        self._stop.set()
        for thread in [*self._threads, *self.senders]:
            thread.join(timeout_s)
        self.audit.stop(timeout_s)  # after the door closed: the last rows are spooled
        self.registry.close()

    # -- studies into tasks -----------------------------------------------------------------

    def _close_and_publish(self) -> None:
        while not self._stop.wait(TICK_S):
            for record in self.book.close_due():
                if record.state is BatchState.DISCARDED:
                    self.metrics.study_refused("too_large" if record.oversized else "no_images")
                    self._record_refusal(record)
            for record in self.book.in_state(BatchState.CLOSED):
                if not self._record(record) or not self._publish(record):
                    return

    def _submission(self, record: BatchRecord) -> Submission:
        task = record.task
        return Submission(
            task_id=record.task_id,
            door=Door.DICOM,
            sender=record.calling_ae,
            original_filename=task.original_filename if task else f"DICOM from {record.calling_ae}",
            study_path=task.study_path if task else "",
            priority=RecordedPriority(task.priority.value) if task else RecordedPriority.ROUTINE,
            received_at=record.opened_at,
            queued_at=utc_now(),
        )

    def _record(self, record: BatchRecord) -> bool:
        """The study in the registry before its task is published (retrying while the database
        is away); False when stopping (it is recorded on the next start)."""
        return self._until_done_or_stopped(
            functools.partial(self.registry.record_submission, self._submission(record)),
            retry_on=REGISTRY_ERRORS,
            backoff=self.settings.registry.unavailable_backoff,
            doing="recording a received study in the registry",
        )

    def _until_done_or_stopped(
        self,
        work: Callable[[], object],
        *,
        retry_on: tuple[type[BaseException], ...],
        backoff: Backoff,
        doing: str,
    ) -> bool:
        """``work()``, retried on ``retry_on`` while what it needs is away: True once done,
        False when the listener stops first (the wait cut short, or the last attempt failed)."""
        attempt = retrying_until_stopped(
            self._stop, retry_on=retry_on, backoff=backoff, before_sleep=log_retry(doing)
        )
        stopped: tuple[type[BaseException], ...] = (WorkInterrupted, *retry_on)
        try:
            attempt(work)
        except stopped:
            return False
        return True

    def _record_refusal(self, record: BatchRecord) -> None:
        """A study the listener would not screen is a Failure row with its reason."""
        from services.adapter.delivery import failed_result

        submission = self._submission(record)
        task = record.task or StudyTask(
            task_id=record.task_id,
            study_path=f"dicom/studies/{record.task_id}",
            original_filename=submission.original_filename,
        )
        reason = record.reason or "the study was not screened"
        try:
            self.registry.record_submission(submission)
            self.registry.record_result(
                failed_result(task, reason, adapter_id="dicom-listener", attempt=0)
            )
        except REGISTRY_ERRORS as error:
            logger.warning("refused task {} not recorded: {}", record.task_id, type(error).__name__)

    def _publish(self, record: BatchRecord) -> bool:
        """Publish a closed batch's task (retrying while the broker is away); False when
        stopping."""
        assert record.task is not None
        published = self._until_done_or_stopped(
            functools.partial(
                submit_task, self.settings.rabbitmq, record.task, name="dicom-listener"
            ),
            retry_on=PUBLISH_ERRORS,
            backoff=self.settings.rabbitmq.reconnect_backoff,
            doing="publishing a received study",
        )
        if not published:
            return False  # stopping; the record stays CLOSED and is published on the next start
        self.book.advance(record.task_id, BatchState.PUBLISHED)
        self.metrics.study_queued()
        logger.info("task {} queued", record.task_id)
        return True

    # -- results into the outbox ------------------------------------------------------------

    def _collect_results(self) -> None:
        while not self._stop.wait(TICK_S):
            for record in self.book.in_state(BatchState.PUBLISHED):
                result = load_result(self.storage_root, record.task_id)
                if result is None:
                    continue
                reports = [self.storage_root / item.path for item in result.files_of_kind(SR_KIND)]
                self._enqueue(record.task_id, reports)
                self.book.advance(record.task_id, BatchState.EXPORTED)
            if self.settings.dicom.send_uploads_to_pacs and self.uploads.due():
                for task_id, reports in self.uploads.collect():
                    self._enqueue(task_id, reports)
            self.metrics.outbox_depth.set(sum(len(outbox.pending()) for outbox in self.outboxes))

    def _enqueue(self, task_id: str, reports: list[Path]) -> None:
        if not reports:
            logger.warning("task {} finished without a structured report to send", task_id)
        for outbox, sender in zip(self.outboxes, self.senders, strict=True):
            for report in reports:
                if report.is_file() and outbox.enqueue(task_id, report):
                    logger.info("task {}: report queued for {}", task_id, outbox.name)
                    self._record_delivery(outbox.name, f"{task_id}_{report.name}", "pending", "")
            if not reports:
                self.uploads.record_none(task_id, outbox.name)
            sender.wake.set()

    def _record_delivery(
        self, destination: str, item_name: str, state: str, status: str, sop_uid: str | None = None
    ) -> None:
        """Best effort: the registry's view of one SR's delivery (the outbox is the truth)."""
        position = report_position(item_name)
        if position is None:
            return
        task_id, report_index = position
        delivery = Delivery(
            task_id=task_id,
            report_index=report_index,
            destination=destination,
            sop_instance_uid=sop_uid,
            state=state,
            status=status,
            updated_at=utc_now(),
        )
        try:
            self.registry.record_delivery(delivery)
        except REGISTRY_ERRORS as error:
            logger.warning("delivery of task {} not recorded: {}", task_id, type(error).__name__)

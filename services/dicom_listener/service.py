"""The listener's moving parts together: the C-STORE receiver, the thread that closes quiet
studies and publishes their tasks, the thread that puts finished studies' SRs in the outbox,
and one sender per destination (with the ReportSink of its kind: DIMSE or STOW-RS).

Tasks are published without a reply queue: the listener reads each result from
``results/<task_id>.json``, which adapters store before they publish, so a result is never
missed, whether the listener was running when it came or not.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from loguru import logger
from tenacity import stop_when_event_set

from services.broker.connection import CONNECTION_ERRORS, submit_task
from services.broker.errors import PublishError
from services.broker.storage import load_result
from services.core.config import ReportDestination, Settings
from services.core.errors import ConfigurationError, WorkInterrupted
from services.core.retry import log_retry, retrying
from services.dicom_listener.export import ReportSender, create_sink
from services.dicom_listener.metrics import ListenerMetrics, listener_metrics
from services.dicom_listener.outbox import Outbox, destination_name
from services.dicom_listener.receiver import StoreReceiver
from services.dicom_listener.studies import BatchRecord, BatchState, StudyBook

TICK_S = 0.5  # how often quiet studies are closed and results looked for
SR_KIND = "sr"
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, PublishError)
# What ends a publish attempt when the listener stops (the last error, or the wait cut short).
STOPPED_PUBLISHING: tuple[type[BaseException], ...] = (WorkInterrupted, *PUBLISH_ERRORS)


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

    def __init__(self, settings: Settings, *, metrics: ListenerMetrics | None = None) -> None:
        self.settings = settings
        self.storage_root = settings.storage.root
        dicom = settings.dicom
        # The destinations first: a wrong one (a missing secret, a folder shared by two)
        # stops the listener before it touches the storage.
        check_distinct_outboxes(dicom.destinations)
        sinks = [create_sink(destination, dicom) for destination in dicom.destinations]
        self.metrics = metrics or listener_metrics()
        self.book = StudyBook(
            self.storage_root,
            quiet_s=dicom.study_quiet_seconds,
            max_bytes=dicom.max_study_mb * 1024 * 1024,
        )
        self.receiver = StoreReceiver(dicom, self.book, self.metrics)
        self.outboxes = [
            Outbox(self.storage_root, destination) for destination in dicom.destinations
        ]
        self._stop = threading.Event()
        self.senders = [
            ReportSender(outbox, sink, settings=dicom, stop_event=self._stop, metrics=self.metrics)
            for outbox, sink in zip(self.outboxes, sinks, strict=True)
        ]
        self._threads = [
            threading.Thread(target=self._close_and_publish, name="study-closer", daemon=True),
            threading.Thread(target=self._collect_results, name="result-collector", daemon=True),
        ]

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self) -> None:
        self.receiver.start()
        for thread in [*self._threads, *self.senders]:
            thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.receiver.stop()
        self._stop.set()
        for thread in [*self._threads, *self.senders]:
            thread.join(timeout_s)

    # -- studies into tasks -----------------------------------------------------------------

    def _close_and_publish(self) -> None:
        while not self._stop.wait(TICK_S):
            for record in self.book.close_due():
                if record.state is BatchState.DISCARDED:
                    self.metrics.study_refused("too_large" if record.oversized else "no_images")
            for record in self.book.in_state(BatchState.CLOSED):
                if not self._publish(record):
                    return

    def _publish(self, record: BatchRecord) -> bool:
        """Publish a closed batch's task (retrying while the broker is away); False when
        stopping."""
        assert record.task is not None
        attempt = retrying(
            retry_on=PUBLISH_ERRORS,
            backoff=self.settings.rabbitmq.reconnect_backoff,
            stop_event=self._stop,
            stop=stop_when_event_set(self._stop),
            before_sleep=log_retry("publishing a received study"),
        )
        try:
            attempt(submit_task, self.settings.rabbitmq, record.task, name="dicom-listener")
        except STOPPED_PUBLISHING:
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
            self.metrics.outbox_depth.set(sum(len(outbox.pending()) for outbox in self.outboxes))

    def _enqueue(self, task_id: str, reports: list[Path]) -> None:
        if not reports:
            logger.warning("task {} finished without a structured report to send", task_id)
        for outbox, sender in zip(self.outboxes, self.senders, strict=True):
            for report in reports:
                if report.is_file() and outbox.enqueue(task_id, report):
                    logger.info("task {}: report queued for {}", task_id, outbox.name)
            sender.wake.set()

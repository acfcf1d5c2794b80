"""Sending the outbox's reports to one destination through its ReportSink, with backoff
while it is down.

One thread per destination, so a destination that is down holds back only its own reports.
A send that cannot be delivered now (DestinationUnavailable: no association or connection,
no answer, busy) is retried through services/core/retry.py with exponential backoff
(dicom.export_backoff) until it goes through or the listener stops; a report the destination
refuses (DestinationRefused: a C-STORE failure status, a STOW-RS 4xx or failure reason) is
put aside (outbox/<destination>/failed/), since sending it again would fail again. Which sink
serves a destination is its ``kind`` (``create_sink``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
from loguru import logger
from pydicom.errors import InvalidDicomError

from services.core.config import DicomSettings, DimseDestination, ReportDestination
from services.core.errors import WorkInterrupted
from services.core.retry import log_retry, retrying
from services.dicom_listener.dimse_sink import DimseSink
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.outbox import Outbox
from services.dicom_listener.report_sink import (
    DestinationRefused,
    DestinationUnavailable,
    ReportSink,
)
from services.dicom_listener.stow_rs_sink import StowRsSink
from services.dicom_listener.tls import destination_context

IDLE_POLL_S = 2.0  # an idle sender looks at its outbox this often (enqueue also wakes it)
# (destination, outbox item name, "sent" | "failed", status text, SOPInstanceUID or None)
DeliveryHook = Callable[[str, str, str, str, str | None], None]


def create_sink(destination: ReportDestination, settings: DicomSettings) -> ReportSink:
    """The sink for ``destination``'s kind (a new kind of destination is added here)."""
    if isinstance(destination, DimseDestination):
        context = destination_context(destination, settings.tls) if destination.tls else None
        return DimseSink(
            destination,
            calling_ae=settings.ae_title,
            timeout_s=settings.network_timeout_s,
            tls_context=context,
        )
    return StowRsSink(destination)


class ReportSender(threading.Thread):
    """Empties one destination's outbox, oldest report first."""

    def __init__(
        self,
        outbox: Outbox,
        sink: ReportSink,
        *,
        settings: DicomSettings,
        stop_event: threading.Event,
        metrics: ListenerMetrics,
        on_outcome: DeliveryHook | None = None,
    ) -> None:
        super().__init__(name=f"sr-sender-{outbox.name}", daemon=True)
        self.on_outcome = on_outcome
        self.outbox = outbox
        self.sink = sink
        self.kind = outbox.destination.kind  # the metrics' label
        self.settings = settings
        self.stop_event = stop_event
        self.metrics = metrics
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            items = self.outbox.pending()
            if not items:
                self.wake.wait(IDLE_POLL_S)
                self.wake.clear()
                continue
            for item in items:
                if self.stop_event.is_set() or not self._deliver(item):
                    return

    def _deliver(self, item: Path) -> bool:
        """Send one report; False when the listener is stopping."""
        try:
            document = pydicom.dcmread(item)
        except FileNotFoundError:
            logger.info("report {} left the outbox before it was sent (purged)", item.name)
            return True
        except (OSError, InvalidDicomError, ValueError) as error:
            # An unreadable file is set aside, never a loop of failing sends.
            logger.error("report {} not sent: {}", item.name, type(error).__name__)
            self.outbox.mark_failed(item, type(error).__name__)
            self.metrics.report_sent(self.kind, delivered=False)
            self._tell(item, "failed", type(error).__name__, None)
            return True
        attempt = retrying(
            retry_on=DestinationUnavailable,
            backoff=self.settings.export_backoff,
            stop_event=self.stop_event,
            before_sleep=log_retry(f"sending a report to {self.sink.describe()}"),
        )
        try:
            status = attempt(self.sink.send, document)
        except WorkInterrupted:
            return False
        except DestinationRefused as error:
            logger.error("report {} refused: {}", item.name, error)
            self.outbox.mark_failed(item, str(error))
            self.metrics.report_sent(self.kind, delivered=False)
            self._tell(item, "failed", str(error), str(document.get("SOPInstanceUID", "")))
            return True
        self.outbox.mark_sent(item, status)
        self.metrics.report_sent(self.kind, delivered=True)
        logger.info("report {} sent to {} ({})", item.name, self.sink.describe(), status)
        self._tell(item, "sent", status, str(document.get("SOPInstanceUID", "")))
        return True

    def _tell(self, item: Path, state: str, status: str, sop_uid: str | None) -> None:
        if self.on_outcome is not None:
            self.on_outcome(self.outbox.name, item.name, state, status, sop_uid or None)

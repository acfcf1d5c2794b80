"""Sending the outbox's reports to one destination by C-STORE, with backoff while it is down.

One thread per destination, so a PACS that is down holds back only its own reports. A send
that cannot reach the destination (no association, no answer) is retried through
services/core/retry.py with exponential backoff (dicom.export_backoff) until it goes through or the listener stops; a report the
destination answers with a failure status is put aside (outbox/<destination>/failed/), since
sending it again would fail again.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from loguru import logger
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE

from services.core.config import DicomDestination, DicomSettings
from services.core.errors import ErrorPolicy, ScreeningError, TransientError, WorkInterrupted
from services.core.retry import log_retry, retrying
from services.dicom_listener.contexts import SR_SEND_SYNTAXES
from services.dicom_listener.outbox import Outbox
from services.monitoring.dicom_listener import ListenerMetrics

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the three warnings.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
IDLE_POLL_S = 2.0  # an idle sender looks at its outbox this often (enqueue also wakes it)


class DestinationUnavailable(TransientError):
    """The destination cannot be reached, refused the association or did not answer."""


class DestinationRefused(ScreeningError):
    """The destination answered the C-STORE with a failure status: this report cannot be
    delivered there as it is (a configuration matter for the PACS administrator)."""

    policy = ErrorPolicy.FAILURE_ROW


def describe_destination(destination: DicomDestination) -> str:
    return f"{destination.ae_title} at {destination.host}:{destination.port}"


def send_report(
    document: Dataset, destination: DicomDestination, *, calling_ae: str, timeout_s: float
) -> str:
    """One C-STORE of ``document``; the status as hex text when it was stored."""
    entity = AE(ae_title=calling_ae)
    entity.add_requested_context(str(document.SOPClassUID), list(SR_SEND_SYNTAXES))
    entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = timeout_s
    entity.connection_timeout = timeout_s
    association = entity.associate(
        destination.host, destination.port, ae_title=destination.ae_title
    )
    if not association.is_established:  # refused connections land here too
        why = "it rejected the association" if association.is_rejected else "no association"
        raise DestinationUnavailable(f"{describe_destination(destination)}: {why}")
    try:
        status = association.send_c_store(document)
    finally:
        association.release()
    if "Status" not in status:
        raise DestinationUnavailable(f"{describe_destination(destination)}: no C-STORE answer")
    code = int(status.Status)
    if code not in STORED_STATUSES:
        raise DestinationRefused(
            f"{describe_destination(destination)}: C-STORE status 0x{code:04X}"
        )
    return f"0x{code:04X}"


class ReportSender(threading.Thread):
    """Empties one destination's outbox, oldest report first."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        settings: DicomSettings,
        stop_event: threading.Event,
        metrics: ListenerMetrics,
    ) -> None:
        super().__init__(name=f"sr-sender-{outbox.name}", daemon=True)
        self.outbox = outbox
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
        destination = self.outbox.destination
        try:
            document = pydicom.dcmread(item)
        except (OSError, InvalidDicomError, ValueError) as error:
            # An unreadable file is set aside, never a loop of failing sends.
            logger.error("report {} not sent: {}", item.name, type(error).__name__)
            self.outbox.mark_failed(item, type(error).__name__)
            self.metrics.report_sent(delivered=False)
            return True
        attempt = retrying(
            retry_on=DestinationUnavailable,
            backoff=self.settings.export_backoff,
            stop_event=self.stop_event,
            before_sleep=log_retry(f"sending a report to {describe_destination(destination)}"),
        )
        try:
            status = attempt(
                send_report,
                document,
                destination,
                calling_ae=self.settings.ae_title,
                timeout_s=self.settings.network_timeout_s,
            )
        except WorkInterrupted:
            return False
        except DestinationRefused as error:
            logger.error("report {} refused: {}", item.name, error)
            self.outbox.mark_failed(item, str(error))
            self.metrics.report_sent(delivered=False)
            return True
        self.outbox.mark_sent(item, status)
        self.metrics.report_sent(delivered=True)
        logger.info(
            "report {} sent to {} ({})", item.name, describe_destination(destination), status
        )
        return True

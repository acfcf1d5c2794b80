"""The C-STORE / C-ECHO service class provider (pynetdicom): instances into the StudyBook.

Every instance is stored exactly as it arrived (the encoded dataset with its file meta), so
compressed transfer syntaxes stay compressed until the pipeline reads them. Logs name
calling AE titles, addresses and hashed study keys, never a value of the data set.
"""

from __future__ import annotations

import logging
from typing import Any

from loguru import logger
from pynetdicom import AE, evt

from services.broker.storage import write_atomically
from services.core.config import DicomSettings
from services.dicom_listener.contexts import (
    IMAGE_STORAGE,
    SR_STORAGE,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    is_image,
)
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.studies import StudyBook

# C-STORE failure statuses (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SUCCESS = 0x0000


def calling_ae_of(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def peer_of(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


class StoreReceiver:
    """The listener's Application Entity: accepts associations, stores instances."""

    def __init__(self, settings: DicomSettings, book: StudyBook, metrics: ListenerMetrics) -> None:
        self.settings = settings
        self.book = book
        self.metrics = metrics
        self.entity = AE(ae_title=settings.ae_title)
        for sop_class in (*IMAGE_STORAGE, *SR_STORAGE):
            self.entity.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self.entity.add_supported_context(VERIFICATION)
        if settings.allowed_calling_ae_titles:
            self.entity.require_calling_aet = list(settings.allowed_calling_ae_titles)
        self.entity.acse_timeout = self.entity.dimse_timeout = settings.network_timeout_s
        self.entity.network_timeout = settings.network_timeout_s
        self.entity.maximum_pdu_size = 0  # no limit on what peers send at once
        self._server: Any = None
        # pynetdicom logs through the standard logging module; its debug output dumps data
        # sets (patient data), so only its warnings and errors are let through.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the free one the OS chose for port 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = self.entity.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        logger.info(
            "DICOM listener {} on {}:{}", self.settings.ae_title, self.settings.host, self.port
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- association events -----------------------------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        self.metrics.association(accepted=True)

    def _on_rejected(self, event: Any) -> None:
        self.metrics.association(accepted=False)
        calling = calling_ae_of(event)
        allowed = self.settings.allowed_calling_ae_titles
        why = "calling AE title not allowed" if allowed and calling not in allowed else "rejected"
        logger.warning("association from {} ({}) refused: {}", calling, peer_of(event), why)

    def _on_aborted(self, event: Any) -> None:
        logger.warning("association from {} ({}) aborted", calling_ae_of(event), peer_of(event))

    # -- C-STORE --------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        calling = calling_ae_of(event)
        try:
            dataset = event.dataset
            study_uid = str(dataset.get("StudyInstanceUID", "") or "")
            sop_instance_uid = str(event.request.AffectedSOPInstanceUID or "")
            sop_class_uid = str(event.request.AffectedSOPClassUID or "")
            encoded = event.encoded_dataset()
        except Exception as error:  # noqa: BLE001 - a broken data set is the sender's; say so
            logger.warning(
                "C-STORE from {}: unreadable data set ({})", calling, type(error).__name__
            )
            return CANNOT_UNDERSTAND
        if not study_uid or not sop_instance_uid:
            logger.warning("C-STORE from {}: an instance without study or instance UID", calling)
            return CANNOT_UNDERSTAND
        slot = self.book.begin_instance(study_uid, sop_instance_uid, calling, len(encoded))
        if slot is None:  # the study is over dicom.max_study_mb: refused when it closes
            return OUT_OF_RESOURCES
        stored = False
        try:
            write_atomically(slot.path, encoded)
            stored = True
        except OSError as error:
            logger.error("C-STORE from {}: not stored ({})", calling, type(error).__name__)
            return OUT_OF_RESOURCES
        finally:
            self.book.end_instance(slot, stored=stored, image=is_image(sop_class_uid))
        self.metrics.instance_received()
        return SUCCESS

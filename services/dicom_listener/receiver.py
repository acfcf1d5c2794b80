"""The C-STORE / C-ECHO service class provider (pynetdicom): instances into the StudyBook.

Every instance is stored exactly as it arrived (the encoded dataset with its file meta), so
compressed transfer syntaxes stay compressed until the pipeline reads them. Logs name
calling AE titles, addresses and hashed study keys, never a value of the data set.

Who may associate is door.py's rules; each association accepted or refused, and each
connection whose TLS handshake failed, is logged and handed to ``audit`` (door_audit.py),
except the accepted C-ECHO of this host's own health check, which would add a row every few
seconds and can carry no data.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any, cast

from loguru import logger
from pynetdicom import AE, evt

from services.broker.storage import write_atomically
from services.core.config import DicomSettings
from services.dicom_listener import door, tls
from services.dicom_listener.contexts import (
    IMAGE_STORAGE,
    SR_STORAGE,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    is_image,
)
from services.dicom_listener.door_audit import door_entry
from services.dicom_listener.metrics import ListenerMetrics
from services.dicom_listener.priority import requested_priority
from services.dicom_listener.studies import StudyBook
from services.registry.audit import AuditAction, AuditEntry

# C-STORE failure statuses (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
NOT_AUTHORIZED = 0x0124  # PS3.7 C.4.2: "Refused: Not Authorized" (the health check's title)
SUCCESS = 0x0000
Audit = Callable[[AuditEntry], None]
SubjectNames = tuple[tuple[tuple[str, str], ...], ...]


def calling_ae_of(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def peer_of(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def called_ae_of(event: Any) -> str:
    return str(event.assoc.requestor.primitive.called_ae_title).strip()


def _socket_of(event: Any) -> Any:
    return getattr(getattr(event.assoc.dul, "socket", None), "socket", None)


def local_address_of(event: Any) -> str:
    """The address the peer reached (one of this host's)."""
    connection = _socket_of(event)
    return str(connection.getsockname()[0]) if connection is not None else ""


def transport_of(event: Any) -> str:
    """TLS version and the peer certificate's subject, or "no TLS": who it was, cryptographically."""
    connection = _socket_of(event)
    if not isinstance(connection, ssl.SSLSocket):
        return "no TLS"
    # getpeercert()'s subject: relative distinguished names, each a tuple of (key, value).
    subject = cast(SubjectNames, (connection.getpeercert() or {}).get("subject", ()))
    common = [value for part in subject for key, value in part if key == "commonName"]
    shown = f", certificate CN={common[0]}" if common else ""
    return f"{connection.version()}{shown}"


class StoreReceiver:
    """The listener's Application Entity: accepts associations, stores instances."""

    def __init__(
        self,
        settings: DicomSettings,
        book: StudyBook,
        metrics: ListenerMetrics,
        audit: Audit,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``tls_context``: tls.listener_context(settings.tls) when the port speaks TLS."""
        self.settings = settings
        self.book = book
        self.metrics = metrics
        self.audit = audit
        self.entity = AE(ae_title=settings.ae_title)
        for sop_class in (*IMAGE_STORAGE, *SR_STORAGE):
            self.entity.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        self.entity.add_supported_context(VERIFICATION)
        self.entity.require_called_aet = True
        self.entity.require_calling_aet = door.admitted_titles(settings.allowed_calling_ae_titles)
        self.entity.acse_timeout = self.entity.dimse_timeout = settings.network_timeout_s
        self.entity.network_timeout = settings.network_timeout_s
        self.entity.maximum_pdu_size = 0  # no limit on what peers send at once
        self._tls_context = tls_context
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
        self._server = tls.start_server(
            self.entity, self.settings, self._tls_context, handlers, self._on_handshake_failure
        )
        logger.info(
            "DICOM listener {} on {}:{} ({})",
            self.settings.ae_title,
            self.settings.host,
            self.port,
            "TLS" if self._tls_context is not None else "no TLS",
        )
        if self._tls_context is None and not door.is_loopback_host(self.settings.host):
            logger.warning("DICOM from the network without TLS: studies cross it unencrypted")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- association events -----------------------------------------------------------------

    def _on_accepted(self, event: Any) -> None:
        calling, peer = calling_ae_of(event), peer_of(event)
        refusal = door.health_check_refusal(
            calling, str(event.assoc.requestor.address), local_address_of(event)
        )
        if refusal is not None:
            event.assoc.abort()
            self._refused(calling, peer, refusal)
            return
        self.metrics.association(accepted=True)
        if calling == door.HEALTH_CHECK_AE:
            return  # this host's own C-ECHO (see the module's docstring)
        detail = f"called {called_ae_of(event)}; {transport_of(event)}"
        self.audit(door_entry(AuditAction.ASSOCIATION_ACCEPTED, calling, peer, detail))

    def _on_rejected(self, event: Any) -> None:
        calling = calling_ae_of(event)
        why = door.refusal_reason(
            calling,
            called_ae_of(event),
            self.settings.ae_title,
            self.settings.allowed_calling_ae_titles,
        )
        self._refused(calling, peer_of(event), why)

    def _on_handshake_failure(self, peer: str, why: str) -> None:
        self._refused("", peer, why)

    def _refused(self, calling: str, peer: str, why: str) -> None:
        self.metrics.association(accepted=False)
        logger.warning("association from {} ({}) refused: {}", calling or "?", peer, why)
        self.audit(door_entry(AuditAction.ASSOCIATION_REFUSED, calling, peer, why))

    def _on_aborted(self, event: Any) -> None:
        logger.warning("association from {} ({}) aborted", calling_ae_of(event), peer_of(event))

    # -- C-STORE --------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        calling = calling_ae_of(event)
        if calling == door.HEALTH_CHECK_AE:
            logger.warning("C-STORE from the health check's AE title refused")
            return NOT_AUTHORIZED
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
        slot = self.book.begin_instance(
            study_uid, sop_instance_uid, calling, len(encoded), requested_priority(dataset)
        )
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

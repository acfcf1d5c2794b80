"""The DIMSE destination: one C-STORE association per report (pynetdicom), over TLS for a
destination with ``tls: true`` (its context from tls.destination_context)."""

from __future__ import annotations

import ssl

from pydicom.dataset import Dataset
from pynetdicom import AE

from services.core.config import DimseDestination
from services.dicom_listener.contexts import SR_SEND_SYNTAXES
from services.dicom_listener.report_sink import DestinationRefused, DestinationUnavailable
from services.dicom_listener.tls import handshake_problem

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the three warnings.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DimseSink:
    """Sends reports to ``destination`` by C-STORE as ``calling_ae``."""

    def __init__(
        self,
        destination: DimseDestination,
        *,
        calling_ae: str,
        timeout_s: float,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.tls_context = tls_context

    def describe(self) -> str:
        destination = self.destination
        secure = ", TLS" if self.tls_context is not None else ""
        return f"{destination.ae_title} at {destination.host}:{destination.port} (DIMSE{secure})"

    def send(self, document: Dataset) -> str:
        """One C-STORE of ``document``; the status as hex text when it was stored."""
        entity = AE(ae_title=self.calling_ae)
        entity.add_requested_context(str(document.SOPClassUID), list(SR_SEND_SYNTAXES))
        entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = self.timeout_s
        entity.connection_timeout = self.timeout_s
        destination = self.destination
        context = self.tls_context
        tls_args = None if context is None else (context, destination.host)
        association = entity.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
        if not association.is_established:  # refused connections and failed handshakes too
            why = "it rejected the association" if association.is_rejected else "no association"
            if context is not None and not association.is_rejected:
                why = handshake_problem(context, destination.host, destination.port, self.timeout_s)
            raise DestinationUnavailable(f"{self.describe()}: {why}")
        try:
            status = association.send_c_store(document)
        finally:
            association.release()
        if "Status" not in status:
            raise DestinationUnavailable(f"{self.describe()}: no C-STORE answer")
        code = int(status.Status)
        if code not in STORED_STATUSES:
            raise DestinationRefused(f"{self.describe()}: C-STORE status 0x{code:04X}")
        return f"0x{code:04X}"

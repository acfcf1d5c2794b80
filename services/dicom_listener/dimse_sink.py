"""The DIMSE destination: one C-STORE association per report (pynetdicom)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE

from services.core.config import DimseDestination
from services.dicom_listener.contexts import SR_SEND_SYNTAXES
from services.dicom_listener.report_sink import DestinationRefused, DestinationUnavailable

# C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the three warnings.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DimseSink:
    """Sends reports to ``destination`` by C-STORE as ``calling_ae``."""

    def __init__(self, destination: DimseDestination, *, calling_ae: str, timeout_s: float) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def describe(self) -> str:
        destination = self.destination
        return f"{destination.ae_title} at {destination.host}:{destination.port} (DIMSE)"

    def send(self, document: Dataset) -> str:
        """One C-STORE of ``document``; the status as hex text when it was stored."""
        entity = AE(ae_title=self.calling_ae)
        entity.add_requested_context(str(document.SOPClassUID), list(SR_SEND_SYNTAXES))
        entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = self.timeout_s
        entity.connection_timeout = self.timeout_s
        destination = self.destination
        association = entity.associate(
            destination.host, destination.port, ae_title=destination.ae_title
        )
        if not association.is_established:  # refused connections land here too
            why = "it rejected the association" if association.is_rejected else "no association"
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

"""What the SR sender needs of a destination: a ``ReportSink``, one per kind of destination.

A sink sends one document and says how it went: it returns the destination's status as
short text when the document was stored, raises :class:`DestinationUnavailable` when it
could not be delivered now (the sender retries with backoff) and
:class:`DestinationRefused` when the destination answered that it will not take it (the
report is set aside in the outbox's failed/; sending it again would fail again).

Implementations: ``dimse_sink.DimseSink`` (C-STORE) and ``stow_rs_sink.StowRsSink``
(DICOMweb STOW-RS); ``export.create_sink`` picks one by the destination's ``kind``. Neither
the messages nor the statuses may carry patient data: they reach the logs and the
outbox's notes.
"""

from __future__ import annotations

from typing import Protocol

from pydicom.dataset import Dataset

from services.core.errors import ErrorPolicy, ScreeningError, TransientError


class DestinationUnavailable(TransientError):
    """The destination cannot be reached, is busy or did not answer: try again later."""


class DestinationRefused(ScreeningError):
    """The destination answered that it does not take this report as it is (a
    configuration matter for its administrator): retrying would fail the same way."""

    policy = ErrorPolicy.FAILURE_ROW


class ReportSink(Protocol):
    """One destination of the structured reports."""

    def describe(self) -> str:
        """The destination in a few words for the logs (no secrets, no patient data)."""
        ...

    def send(self, document: Dataset) -> str:
        """Deliver ``document``; the destination's status as text when it was stored.

        Raises DestinationUnavailable (retry later) or DestinationRefused (set aside).
        """
        ...

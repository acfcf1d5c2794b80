"""The one error policy of the project: what happens to a study when something goes wrong.

Every error raised on purpose derives from :class:`ScreeningError` and carries its
:class:`ErrorPolicy`; callers ask :func:`policy_of` instead of listing exception types.

* ``FAILURE_ROW``: the study itself cannot be screened (a broken archive, no usable series,
  not a chest). It gets a Failure row whose reason is ``str(error)``; retrying would fail
  again. Any error that is not a ScreeningError (a bug, a corrupt pixel stream that a
  library rejects) is treated the same way: one broken study never stops the others.
* ``RETRY_LATER``: the study is fine but something it needs is not there now (the model
  server is unreachable, the shared storage does not show the file yet, the worker is
  stopping). The study is not failed: it is retried by the same worker or handed back to
  the queue, and the adapter's delivery rules (services/adapter/delivery.py) bound how often.
* ``STOP``: the deployment is wrong (no model repository, thresholds for unknown
  findings). Every study would fail the same way, so the process stops with the reason
  instead of writing a Failure row per study.

docs/ARCHITECTURE.md ("Error policy") shows where each kind is raised and handled.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from services.core.schemas import IntakeSummary


class ErrorPolicy(str, Enum):
    FAILURE_ROW = "failure_row"
    RETRY_LATER = "retry_later"
    STOP = "stop"


class ScreeningError(Exception):
    """Base of every error this project raises on purpose."""

    policy: ClassVar[ErrorPolicy] = ErrorPolicy.FAILURE_ROW


class StudyError(ScreeningError):
    """The study cannot be screened; ``str(error)`` is the reason in its Failure row.

    ``warnings`` holds what was found before the failure (e.g. duplicate slices next to the
    missing ones), so the Failure row can still show it.
    """

    policy = ErrorPolicy.FAILURE_ROW

    def __init__(self, reason: str, *, warnings: list[str] | None = None) -> None:
        super().__init__(reason)
        self.warnings = list(warnings or [])


class TransientError(ScreeningError):
    """The study is fine, something it needs is unavailable right now: retry later."""

    policy = ErrorPolicy.RETRY_LATER


class ConfigurationError(ScreeningError):
    """The deployment is misconfigured: stop and say why, do not fail study after study."""

    policy = ErrorPolicy.STOP


# -- FAILURE_ROW --------------------------------------------------------------------------


class IntakeError(StudyError):
    """The input as a whole cannot be used (broken, hostile or empty archive); ``summary``
    holds what was counted before the failure."""

    def __init__(self, reason: str, summary: IntakeSummary | None = None) -> None:
        super().__init__(reason)
        self.summary = summary


class SeriesDataError(StudyError):
    """The selected series cannot become a volume (geometry, missing slices, pixel data)."""


class ModelServerWaitExceeded(StudyError):
    """The model server stayed unavailable longer than a study may wait
    (inference.model_server_wait_limit_s): the study fails instead of holding its worker."""


# -- RETRY_LATER --------------------------------------------------------------------------


class ModelServerUnavailable(TransientError):
    """The model server is unreachable, overloaded or timed out."""


class StudyNotFound(TransientError):
    """The task's study is not in the shared storage (yet): a shared volume may show a new
    file late, and another worker may mount it properly. Retried a bounded number of times."""


class WorkInterrupted(TransientError):
    """The worker is stopping while the study is in progress: it goes back to the queue."""


# -- STOP ---------------------------------------------------------------------------------


class ModelRepositoryError(ConfigurationError):
    """The model repository is missing or incomplete."""


class ThresholdError(ConfigurationError):
    """Configured thresholds that do not fit the model (unknown finding, out of range)."""


def policy_of(error: BaseException) -> ErrorPolicy:
    """The policy for ``error``; anything not raised on purpose fails its study only."""
    if isinstance(error, ScreeningError):
        return error.policy
    return ErrorPolicy.FAILURE_ROW


def reason_of(error: BaseException) -> str:
    """The text of an error for a Failure row: its message, or its type when it has none."""
    text = str(error).strip()
    if isinstance(error, ScreeningError):
        return text or type(error).__name__
    # An unexpected error: the type name says more than a bare message such as "3".
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

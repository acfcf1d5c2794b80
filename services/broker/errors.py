"""The broker package's errors, in the project's error policy (services/core/errors.py)."""

from __future__ import annotations

from services.core.errors import ErrorPolicy, ScreeningError


class BrokerError(ScreeningError):
    """Base of the errors raised by services.broker."""


class MessageError(BrokerError):
    """A message body that is not a valid message of the expected type: it cannot be
    processed, ever (a Failure result to its sender when it has one, then dead-lettered)."""

    policy = ErrorPolicy.FAILURE_ROW


class PublishError(BrokerError):
    """The broker did not take the message (no queue for it, or a negative confirm)."""

    policy = ErrorPolicy.RETRY_LATER

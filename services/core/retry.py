"""The one way this project retries: exponential backoff through tenacity.

Every loop that waits for something to come back (RabbitMQ, the model server, a region
Triton still holds, a PACS) is a :func:`retrying` call with its own exception types and a
:class:`~services.core.config.Backoff` from the configuration (the one place its numbers
live), so the backoff, the stop-on-shutdown rule and the log line are the same everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loguru import logger
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_any,
    stop_before_delay,
    stop_never,
    stop_when_event_set,
    wait_exponential,
)
from tenacity.retry import retry_base
from tenacity.stop import stop_base

from services.core.config import Backoff
from services.core.errors import WorkInterrupted

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]
# Which errors to retry: exception types, or a test of the error.
RetryOn = ExceptionTypes | Callable[[BaseException], bool]


def interruptible_sleep(stop_event: threading.Event) -> Callable[[float], None]:
    """A sleep that ends early, raising WorkInterrupted, when ``stop_event`` is set."""

    def sleep(seconds: float) -> None:
        if stop_event.wait(seconds):
            raise WorkInterrupted("stopping while waiting to retry")

    return sleep


def log_retry(what: str) -> Callable[[RetryCallState], None]:
    """A ``before_sleep`` hook: one warning line naming the error and the coming wait."""

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "{} failed ({}); retrying in {:.1f} s",
            what,
            type(error).__name__ if error is not None else "no result",
            state.upcoming_sleep,
        )

    return before_sleep


def retrying(
    *,
    retry_on: RetryOn,
    backoff: Backoff,
    give_up_after_s: float | None = None,
    stop_event: threading.Event | None = None,
    stop: stop_base | None = None,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> Retrying:
    """Retry on ``retry_on`` (types or a test) with the backoff's delays: initial_s, 2x, 4x ...
    capped at maximum_s.

    It gives up (re-raising the last error) before a wait would pass ``give_up_after_s``
    (default: the backoff's) or when ``stop`` says so; ``stop_event`` cuts a wait short with
    WorkInterrupted.
    """
    stops: list[stop_base] = []
    limit_s = give_up_after_s if give_up_after_s is not None else backoff.give_up_after_s
    if limit_s is not None:
        stops.append(stop_before_delay(limit_s))
    if stop is not None:
        stops.append(stop)
    retry: retry_base
    if isinstance(retry_on, (type, tuple)):
        retry = retry_if_exception_type(retry_on)
    else:
        retry = retry_if_exception(retry_on)
    return Retrying(
        retry=retry,
        wait=wait_exponential(multiplier=backoff.initial_s, min=0, max=backoff.maximum_s),
        stop=stop_any(*stops) if stops else stop_never,
        sleep=interruptible_sleep(stop_event) if stop_event is not None else time.sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def retrying_until_stopped(
    stopping: threading.Event,
    *,
    retry_on: RetryOn,
    backoff: Backoff,
    before_sleep: Callable[[RetryCallState], None],
) -> Retrying:
    """:func:`retrying` in a service that is stopped by ``stopping``: a stop cuts a wait
    short (WorkInterrupted) and no attempt starts after it (the last error is re-raised)."""
    return retrying(
        retry_on=retry_on,
        backoff=backoff,
        stop_event=stopping,
        stop=stop_when_event_set(stopping),
        before_sleep=before_sleep,
    )


def backoff_delay(backoff: Backoff, failures: int) -> float:
    """The wait after the ``failures``-th failed attempt, as :func:`retrying` waits (the same
    tenacity formula): for a retry whose schedule is kept on disk or in a database, so that
    a restart goes on where it stopped instead of looping in memory."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, failures)
    wait = wait_exponential(multiplier=backoff.initial_s, min=0, max=backoff.maximum_s)
    return float(wait(state))

"""Waiting through a model-server outage without failing or giving back the study.

A transient Triton failure makes the worker wait and retry the same request: the study is
neither failed nor given back to the queue (that would count as a delivery), and the pika
I/O thread keeps the broker connection alive meanwhile. A shutdown ends the wait
(WorkInterrupted: the task goes back to the queue); so does ``wait_limit_s``
(ModelServerWaitExceeded: the study fails), because a request that times out every time
(inference.triton_timeout_s) or a server that never comes back must not hold the study
forever. Keep the limit under RabbitMQ's consumer_timeout (30 min by default), after which
the broker would take the unacked task back.

The body-part regression model the backend serves (the chest check's network, called while
the study is prepared) is wrapped the same way: its requests wait through the same outage.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from loguru import logger
from tenacity import RetryCallState
from tenacity.stop import stop_base

from services.core.arrays import Float32Array, ModelInput
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.config import Backoff
from services.core.errors import ModelServerUnavailable, ModelServerWaitExceeded, WorkInterrupted
from services.core.inference.base import InferenceBackend, ModelOutputs
from services.core.retry import retrying

Result = TypeVar("Result")


class RetryingBackend:
    """An InferenceBackend that waits and retries while the model server is unavailable."""

    def __init__(
        self,
        backend: InferenceBackend,
        stop: threading.Event,
        *,
        backoff: Backoff,
        on_retry: Callable[[str], None] | None = None,
        wait_limit_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._backend = backend
        self._stop = stop
        self._on_retry = on_retry
        self._on_wait = on_wait  # the seconds of each coming wait (metrics)
        self._backoff = backoff
        self._wait_limit_s = wait_limit_s
        self._clock = clock
        self.name = backend.name
        self.metadata = backend.metadata
        self.computes_on_this_cpu = backend.computes_on_this_cpu
        self.retries = 0
        model = backend.body_part_model
        self.body_part_model: BodyPartRegressionModel | None = (
            None
            if model is None
            else dataclasses.replace(model, score_slices=self._retried(model.score_slices))
        )

    def infer(self, volume: ModelInput) -> ModelOutputs:
        return self._call(self._backend.infer, volume)

    def _retried(
        self, function: Callable[[Float32Array], Result]
    ) -> Callable[[Float32Array], Result]:
        def call(array: Float32Array) -> Result:
            return self._call(function, array)

        return call

    def _call(self, function: Callable[[Float32Array], Result], array: Float32Array) -> Result:
        """``function(array)``, waiting and retrying while the model server is unavailable."""
        if self._stop.is_set():
            raise WorkInterrupted("the adapter is stopping")
        first_failure: float | None = None

        def over_the_limit(state: RetryCallState) -> bool:
            """Called after every failure, with the coming wait known: count it, and give
            up when waiting again would pass the study's limit."""
            nonlocal first_failure
            self.retries += 1
            now = self._clock()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            error = state.outcome.exception() if state.outcome is not None else None
            if (
                self._wait_limit_s is not None
                and waited + state.upcoming_sleep > self._wait_limit_s
            ):
                raise ModelServerWaitExceeded(
                    f"the model server was unavailable for {waited:.0f} s; a study waits at most "
                    f"{self._wait_limit_s:.0f} s (inference.model_server_wait_limit_s); "
                    f"last error: {error}"
                ) from error
            return False

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            delay = state.upcoming_sleep
            logger.warning("model server unavailable ({}); retrying in {:.0f} s", error, delay)
            if self._on_retry is not None:
                self._on_retry(f"model server unavailable, retrying in {delay:.0f} s")
            if self._on_wait is not None:
                self._on_wait(delay)

        return retrying(
            retry_on=ModelServerUnavailable,
            backoff=self._backoff,
            stop_event=self._stop,
            stop=_StopWhen(over_the_limit),
            before_sleep=before_sleep,
        )(function, array)

    def close(self) -> None:
        self._backend.close()


class _StopWhen(stop_base):
    """A tenacity stop condition from a function of the retry state."""

    def __init__(self, test: Callable[[RetryCallState], bool]) -> None:
        self._test = test

    def __call__(self, state: RetryCallState) -> bool:
        return self._test(state)

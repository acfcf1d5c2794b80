"""What an adapter tells Prometheus: tasks by outcome, studies by status, the time of every
pipeline stage, the model server's requests, retries and outages, the studies in progress.

One :class:`AdapterMetrics` per process (:func:`adapter_metrics`, on prometheus_client's
default registry, served by services/monitoring/server.py); tests pass their own registry.
Stage times come from each report's ``stage_seconds`` (the pipeline's own clock,
services/core/pipeline/events.py), so the histogram and the JSON report agree.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

from services.adapter.delivery import Action, Decision
from services.adapter.held_inputs import Handover
from services.broker.schemas import StudyResult, TaskStatus
from services.core.arrays import Float32Array, ModelInput
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.errors import ModelServerUnavailable
from services.core.inference.base import InferenceBackend, ModelOutputs
from services.monitoring.families import MetricFamilies

Result = TypeVar("Result")

# Seconds: a stage of a tiny test study takes milliseconds, the full encoder on a CPU a minute.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TASK_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
# The names the model requests are counted under (the ensemble and the chest check's network).
SCREENING_MODEL = "screening"
BODY_PART_MODEL = "body_part_regression"
# Why an adapter waited instead of working.
WAIT_MODEL_SERVER = "model_server"
WAIT_BROKER = "broker"


class TaskOutcome(str, Enum):
    """Label values of ``cts_adapter_tasks_total``."""

    COMPLETED = "completed"  # the pipeline ran (its studies may be Failure rows)
    FAILED = "failed"  # a Failure result for the whole task
    REPUBLISHED = "republished"  # a stored result sent again, nothing recomputed
    REQUEUED = "requeued"  # given back to the queue
    DEAD_LETTERED = "dead_lettered"  # for a human, with its reason


def task_outcome(decision: Decision, *, republished: bool = False) -> TaskOutcome:
    """The outcome label of an executed decision."""
    if decision.action is Action.REQUEUE:
        return TaskOutcome.REQUEUED
    if decision.action is Action.DEAD_LETTER:
        return TaskOutcome.DEAD_LETTERED
    if republished:
        return TaskOutcome.REPUBLISHED
    if decision.result is not None and decision.result.status is TaskStatus.FAILED:
        return TaskOutcome.FAILED
    return TaskOutcome.COMPLETED


class AdapterMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        families = MetricFamilies(registry)
        self.tasks = families.counter(
            "cts_adapter_tasks", "Task messages an adapter finished with, by outcome", "outcome"
        )
        self.studies = families.counter(
            "cts_adapter_studies",
            "Studies screened, by the report's processing_status (Success / Failure)",
            "status",
        )
        self.stage_seconds = families.histogram(
            "cts_adapter_stage_seconds",
            "Seconds of each pipeline stage of a study (the report's stage_seconds)",
            "stage",
            buckets=STAGE_BUCKETS,
        )
        self.task_seconds = families.histogram(
            "cts_adapter_task_seconds",
            "Seconds from taking a task to its result (the whole input, report files included)",
            buckets=TASK_BUCKETS,
        )
        self.model_request_seconds = families.histogram(
            "cts_adapter_model_request_seconds",
            "Seconds of one request to the model server (each attempt), by model and outcome",
            "model",
            "outcome",
            buckets=STAGE_BUCKETS,
        )
        self.model_input_bytes = families.counter(
            "cts_adapter_model_input_bytes",
            "Bytes of model input sent to the model server, by transport",
            "transport",
        )
        self.model_retries = families.counter(
            "cts_adapter_model_server_retries",
            "Model requests retried because the model server was unavailable",
        )
        self.transient_wait_seconds = families.counter(
            "cts_adapter_transient_wait_seconds",
            "Seconds spent waiting out a transient error before retrying, by cause",
            "cause",
        )
        self.model_inputs = families.counter(
            "cts_adapter_model_inputs",
            "Model inputs the model stage read, by where from (memory, file); prepared_again: "
            "tasks it sent back to their preparation because an input was gone",
            "handover",
        )
        self.in_progress = families.gauge(
            "cts_adapter_tasks_in_progress", "Tasks this adapter is working on right now"
        )
        families.show_at_zero(self.tasks, [outcome.value for outcome in TaskOutcome])
        families.show_at_zero(self.transient_wait_seconds, [WAIT_MODEL_SERVER, WAIT_BROKER])
        families.show_at_zero(self.model_inputs, [handover.value for handover in Handover])

    # -- observations ----------------------------------------------------------------------

    def task_finished(self, decision: Decision, *, republished: bool = False) -> None:
        self.tasks.labels(task_outcome(decision, republished=republished).value).inc()

    def result_computed(self, result: StudyResult) -> None:
        """A result this adapter computed: its studies, their stages, the task's time."""
        self.task_seconds.observe(result.seconds)
        for report in result.reports:
            self.studies.labels(report.processing_status.value).inc()
            for stage, seconds in report.stage_seconds.items():
                self.stage_seconds.labels(stage).observe(seconds)

    def waited(self, cause: str, seconds: float) -> None:
        self.transient_wait_seconds.labels(cause).inc(max(seconds, 0.0))

    def model_input_handed_over(self, handover: Handover) -> None:
        self.model_inputs.labels(handover.value).inc()

    def model_server_retry(self, seconds: float) -> None:
        self.model_retries.inc()
        self.waited(WAIT_MODEL_SERVER, seconds)


@functools.cache
def adapter_metrics() -> AdapterMetrics:
    """This process's adapter metrics, on the default registry (created once)."""
    return AdapterMetrics()


class MeteredBackend:
    """An InferenceBackend that times every model request (each attempt) and counts the
    bytes it sends; wraps the backend below the retries, so an outage shows as failed
    attempts and a retry count."""

    def __init__(self, backend: InferenceBackend, metrics: AdapterMetrics) -> None:
        self._backend = backend
        self._metrics = metrics
        self.name = backend.name
        self.metadata = backend.metadata
        self.computes_on_this_cpu = backend.computes_on_this_cpu
        self.transport: str = getattr(backend, "transport", "in_process")
        model = backend.body_part_model
        self.body_part_model: BodyPartRegressionModel | None = (
            None
            if model is None
            else dataclasses.replace(
                model, score_slices=self._timed(BODY_PART_MODEL, model.score_slices)
            )
        )
        self._infer = self._timed(SCREENING_MODEL, backend.infer)

    def infer(self, volume: ModelInput) -> ModelOutputs:
        return self._infer(volume)

    def close(self) -> None:
        self._backend.close()

    def _timed(
        self, model: str, function: Callable[[Float32Array], Result]
    ) -> Callable[[Float32Array], Result]:
        def call(array: Float32Array) -> Result:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = function(array)
                outcome = "ok"
                return result
            except ModelServerUnavailable:
                outcome = "unavailable"
                raise
            finally:
                self._metrics.model_request_seconds.labels(model, outcome).observe(
                    time.perf_counter() - started
                )
                self._metrics.model_input_bytes.labels(self.transport).inc(array.nbytes)

        return call

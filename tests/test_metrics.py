"""The services' Prometheus metrics without a stack: the endpoint, what the adapter and the
frontend count, and the text Prometheus reads (tests/test_metrics_prometheus.py scrapes a
running stack with a real Prometheus)."""

from __future__ import annotations

import socket
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.adapter.delivery import Action, Decision, failed_result
from services.adapter.metrics import (
    BODY_PART_MODEL,
    SCREENING_MODEL,
    AdapterMetrics,
    MeteredBackend,
    TaskOutcome,
    task_outcome,
)
from services.adapter.model_server_wait import RetryingBackend
from services.broker.schemas import StudyResult, StudyTask, TaskStatus, utc_now
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.body_part.bpr_settings import demo_inference_settings
from services.core.config import Backoff, MetricsSettings, load_settings
from services.core.errors import ModelServerUnavailable
from services.core.inference.base import ModelOutputs
from services.core.schemas import ProcessingStatus, StudyReport
from services.dicom_listener.metrics import ListenerMetrics
from services.frontend.metrics import FrontendMetrics, Refusal
from services.frontend.uploads import plan_uploads
from services.monitoring.server import serve_metrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_endpoint_serves_on_loopback_by_default_and_never_stops_a_service() -> None:
    defaults = load_settings(environ={}).metrics
    assert defaults.host == "127.0.0.1"
    assert defaults.enabled
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    metrics.tasks.labels(TaskOutcome.COMPLETED.value).inc()
    endpoint = serve_metrics(MetricsSettings(), port=0, service="test adapter", registry=registry)
    assert endpoint is not None
    try:
        assert endpoint.host == "127.0.0.1"
        assert endpoint.port > 0
        families = scrape(endpoint.url)
        completed = [s for s in families["cts_adapter_tasks"] if s.name.endswith("_total")]
        by_outcome = {s.labels["outcome"]: s.value for s in completed}
        # Every outcome is there from the start (a rate over a missing series is no rate).
        assert by_outcome == {
            "completed": 1.0,
            "failed": 0.0,
            "republished": 0.0,
            "requeued": 0.0,
            "dead_lettered": 0.0,
        }
        # The port is taken now: a second server is refused, and the caller runs on.
        second = serve_metrics(
            MetricsSettings(), port=endpoint.port, service="second", registry=registry
        )
        assert second is None
    finally:
        endpoint.close()
    assert serve_metrics(MetricsSettings(enabled=False), port=0, service="off") is None
    with pytest.raises(ConnectionRefusedError):  # closed: nothing listens there any more
        socket.create_connection(("127.0.0.1", endpoint.port), timeout=5).close()


def _task() -> StudyTask:
    return StudyTask(task_id="t1", study_path="uploads/t1/study.zip", original_filename="s.zip")


def _result(*statuses: ProcessingStatus) -> StudyResult:
    reports = [
        StudyReport(
            path_to_study="s.zip",
            processing_status=status,
            stage_seconds={"intake": 0.02, "inference": 3.0},
        )
        for status in statuses
    ]
    return StudyResult(
        task_id="t1", status=TaskStatus.COMPLETED, reports=reports, adapter_id="a", seconds=4.0
    )


def test_task_outcomes_follow_the_delivery_decision() -> None:
    task = _task()
    failed = failed_result(task, "broken", adapter_id="a", attempt=1)
    done = _result(ProcessingStatus.SUCCESS)
    assert task_outcome(Decision(Action.ACK, result=done)) is TaskOutcome.COMPLETED
    assert task_outcome(Decision(Action.ACK, result=failed)) is TaskOutcome.FAILED
    assert task_outcome(Decision(Action.ACK, result=done), republished=True) is (
        TaskOutcome.REPUBLISHED
    )
    assert task_outcome(Decision(Action.REQUEUE)) is TaskOutcome.REQUEUED
    assert task_outcome(Decision(Action.DEAD_LETTER, result=failed)) is TaskOutcome.DEAD_LETTERED


def test_a_computed_result_counts_its_studies_and_every_stage() -> None:
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    metrics.result_computed(_result(ProcessingStatus.SUCCESS, ProcessingStatus.FAILURE))
    assert sample(registry, "cts_adapter_studies_total", status="Success") == 1
    assert sample(registry, "cts_adapter_studies_total", status="Failure") == 1
    assert sample(registry, "cts_adapter_stage_seconds_count", stage="inference") == 2
    assert sample(registry, "cts_adapter_stage_seconds_sum", stage="inference") == 6.0
    # 3 s falls in the 5-second bucket, not in the 2.5-second one.
    assert sample(registry, "cts_adapter_stage_seconds_bucket", stage="inference", le="2.5") == 0
    assert sample(registry, "cts_adapter_stage_seconds_bucket", stage="inference", le="5.0") == 2
    assert sample(registry, "cts_adapter_task_seconds_count") == 1


class _FlakyServer:
    """A model server that is unavailable for its first ``failures`` requests of each model."""

    name = "triton"
    metadata = None
    transport = "grpc"
    computes_on_this_cpu = False

    def __init__(self, failures: int) -> None:
        self.failures = {"infer": failures, "scores": failures}

        def scores(slices: np.ndarray) -> np.ndarray:
            self._maybe_fail("scores")
            return np.zeros((len(slices), 1), np.float32)

        self.body_part_model = BodyPartRegressionModel(
            score_slices=scores, settings=demo_inference_settings(), demo=True, source="test"
        )

    def _maybe_fail(self, what: str) -> None:
        if self.failures[what] > 0:
            self.failures[what] -= 1
            raise ModelServerUnavailable("unavailable")

    def infer(self, volume: np.ndarray) -> ModelOutputs:
        self._maybe_fail("infer")
        return ModelOutputs(volume[:, :1, 0, 0, 0], volume[:, 0, 0, 0, 0], volume[:, 0, 0, 0])

    def close(self) -> None:
        pass


def test_model_requests_are_timed_per_attempt_and_retries_counted_with_their_waits() -> None:
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    server = _FlakyServer(failures=2)
    server.computes_on_this_cpu = True
    metered = MeteredBackend(server, metrics)
    backend = RetryingBackend(
        metered,
        threading.Event(),
        backoff=Backoff(initial_s=0.01, maximum_s=0.01),
        on_wait=metrics.model_server_retry,
    )
    assert backend.computes_on_this_cpu  # passed on through both wrappers
    volume = np.ones((1, 1, 2, 3, 4), np.float32)
    backend.infer(volume)
    assert backend.body_part_model is not None
    backend.body_part_model.score_slices(np.zeros((4, 1, 8, 8), np.float32))

    def requests(model: str, outcome: str) -> float:
        return sample(
            registry, "cts_adapter_model_request_seconds_count", model=model, outcome=outcome
        )

    for model in (SCREENING_MODEL, BODY_PART_MODEL):
        assert (requests(model, "unavailable"), requests(model, "ok")) == (2, 1)
    assert sample(registry, "cts_adapter_model_server_retries_total") == 4
    waited = sample(registry, "cts_adapter_transient_wait_seconds_total", cause="model_server")
    assert waited == pytest.approx(0.04)  # four waits of 0.01 s (the cap)
    sent = volume.nbytes * 3 + 4 * 8 * 8 * 4 * 3  # every attempt sends its input
    assert sample(registry, "cts_adapter_model_input_bytes_total", transport="grpc") == sent


def test_frontend_counts_refusals_by_reason_and_the_reply_lag(tmp_path: Path) -> None:
    settings = load_settings(environ={})
    settings.frontend.max_upload_mb = 1
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    plan = plan_uploads([big, tmp_path / "never-arrived.zip"], settings)
    assert plan.refusals == [Refusal.TOO_LARGE, Refusal.NOT_ARRIVED]
    assert len(plan.refused) == 2

    registry = CollectorRegistry()
    metrics = FrontendMetrics(registry)
    for reason in plan.refusals:
        metrics.refusal(reason)
    metrics.refusal(Refusal.QUEUE_FULL, uploads=3)
    assert sample(registry, "cts_frontend_uploads_refused_total", reason="too_large") == 1
    assert sample(registry, "cts_frontend_uploads_refused_total", reason="queue_full") == 3
    assert sample(registry, "cts_frontend_uploads_refused_total", reason="publish_failed") == 0

    result = _result(ProcessingStatus.SUCCESS)
    result.finished_at = utc_now() - timedelta(seconds=7)
    metrics.result_received(result)
    assert sample(registry, "cts_frontend_results_total", status="completed") == 1
    lag = sample(registry, "cts_frontend_reply_lag_seconds_sum")
    assert 7.0 <= lag < 60.0
    assert sample(registry, "cts_frontend_reply_lag_seconds_bucket", le="5.0") == 0


def test_listener_hook_counts_what_the_listener_reports() -> None:
    registry = CollectorRegistry()
    metrics = ListenerMetrics(registry)
    metrics.association(accepted=True)
    metrics.association(accepted=False)
    for _ in range(30):
        metrics.instance_received()
    metrics.study_queued()
    metrics.report_sent("stow-rs", delivered=False)
    metrics.outbox_depth.set(1)
    assert sample(registry, "cts_dicom_associations_total", result="rejected") == 1
    assert sample(registry, "cts_dicom_instances_received_total") == 30
    assert sample(registry, "cts_dicom_studies_queued_total") == 1
    assert sample(registry, "cts_dicom_reports_sent_total", kind="stow-rs", result="failed") == 1
    assert sample(registry, "cts_dicom_reports_sent_total", kind="stow-rs", result="delivered") == 0
    dimse_failed = {"kind": "dimse", "result": "failed"}  # exists at 0 before the first report
    assert registry.get_sample_value("cts_dicom_reports_sent_total", dimse_failed) == 0.0
    assert sample(registry, "cts_dicom_outbox_depth") == 1

"""What a frontend tells Prometheus: uploads queued, duplicates, refusals by reason, results
received and how late they arrive (services/monitoring/server.py serves them).

One :class:`FrontendMetrics` per process (:func:`frontend_metrics`); tests pass a registry.
"""

from __future__ import annotations

import functools
from enum import Enum

from prometheus_client import REGISTRY, CollectorRegistry

from services.broker.schemas import StudyResult, utc_now
from services.monitoring.families import MetricFamilies

# Seconds from the adapter's finished_at to this frontend reading the result: milliseconds
# normally, minutes when the frontend was down or the broker restarted.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Refusal(str, Enum):
    """Why an upload was not queued (label values of ``cts_frontend_uploads_refused_total``)."""

    NOT_ARRIVED = "not_arrived"  # the browser's upload did not complete
    TOO_LARGE = "too_large"  # over frontend.max_upload_mb
    UNPACKED_TOO_LARGE = "unpacked_too_large"  # over intake.max_uncompressed_bytes
    QUEUE_FULL = "queue_full"  # rabbitmq.max_queue_depth tasks already wait
    BROKER_UNREACHABLE = "broker_unreachable"
    PUBLISH_FAILED = "publish_failed"


class FrontendMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        families = MetricFamilies(registry)
        self.uploads = families.counter("cts_frontend_uploads", "Uploads queued as tasks")
        self.duplicates = families.counter(
            "cts_frontend_duplicate_uploads",
            "Uploads whose bytes the session had already screened (not queued again)",
        )
        self.refused = families.counter(
            "cts_frontend_uploads_refused", "Uploads refused, by reason", "reason"
        )
        self.results = families.counter(
            "cts_frontend_results",
            "Results this frontend recorded in the study registry (the first time), by task status",
            "status",
        )
        self.reply_lag_seconds = families.histogram(
            "cts_frontend_reply_lag_seconds",
            "Seconds from a result's finished_at (adapter) to this frontend recording it",
            buckets=LAG_BUCKETS,
        )
        families.show_at_zero(self.refused, [reason.value for reason in Refusal])

    def refusal(self, reason: Refusal, uploads: int = 1) -> None:
        self.refused.labels(reason.value).inc(uploads)

    def result_received(self, result: StudyResult) -> None:
        self.results.labels(result.status.value).inc()
        lag = (utc_now() - result.finished_at).total_seconds()
        self.reply_lag_seconds.observe(max(lag, 0.0))  # clocks of two hosts may disagree a bit


@functools.cache
def frontend_metrics() -> FrontendMetrics:
    """This process's frontend metrics, on the default registry (created once)."""
    return FrontendMetrics()

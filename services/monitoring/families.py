"""How a service declares its Prometheus metrics: every family of one service on one registry
(prometheus_client's default one in a service process, a test's own in a test), and the label
values known up front created at once, so that each series shows, at 0, from the start.

    families = MetricFamilies(registry)
    self.refused = families.counter("cts_x_refused", "Things refused, by reason", "reason")
    families.show_at_zero(self.refused, ["too_large", "queue_full"])

The services' own metrics: services/adapter/metrics.py, services/frontend/metrics.py,
services/dicom_listener/metrics.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


class MetricFamilies:
    """The metric families of one service, all registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def histogram(
        self, name: str, documentation: str, *labels: str, buckets: Sequence[float]
    ) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    @staticmethod
    def show_at_zero(family: MetricWrapperBase, *label_values: Iterable[str]) -> None:
        """Create the series of every combination of ``label_values`` (one iterable per
        label, in the family's label order): a dashboard sees 0, not "no data"."""
        for values in itertools.product(*label_values):
            family.labels(*values)

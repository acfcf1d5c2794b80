"""The DICOM listener's metrics (python -m services.dicom_listener): the hook it calls.

The listener serves them with::

    from services.dicom_listener.metrics import listener_metrics
    from services.monitoring.server import serve_metrics

    endpoint = serve_metrics(settings.metrics, port=settings.metrics.dicom_listener_port,
                             service="dicom listener")
    metrics = listener_metrics()
    metrics.association(accepted=True)       # each association request
    metrics.instance_received()              # each C-STORE it accepted
    metrics.study_queued()                   # a complete study became a task
    metrics.study_refused("too_large")       # a study it would not take, by reason
    metrics.report_sent("dimse", delivered=True)  # each SR sent, by destination kind
    metrics.outbox_depth.set(len(outbox))    # reports waiting for a destination
    metrics.audit_pending.set(n)             # audit rows of the door not yet in the registry
    metrics.audit_rows_lost.inc()            # an audit row that could not be written at all
"""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, CollectorRegistry

from services.monitoring.families import MetricFamilies

# Every kind of SR destination (services/core/config.py), so that each series exists at 0.
DESTINATION_KINDS = ("dimse", "stow-rs")


class ListenerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        families = MetricFamilies(registry)
        self.associations = families.counter(
            "cts_dicom_associations", "Association requests to the listener, by result", "result"
        )
        self.instances = families.counter(
            "cts_dicom_instances_received", "DICOM instances received by C-STORE"
        )
        self.studies = families.counter(
            "cts_dicom_studies_queued", "Complete studies queued for screening"
        )
        self.refused = families.counter(
            "cts_dicom_studies_refused", "Studies the listener refused, by reason", "reason"
        )
        self.reports = families.counter(
            "cts_dicom_reports_sent",
            "Structured reports sent to a destination, by kind of destination (dimse / "
            "stow-rs) and result (delivered / failed)",
            "kind",
            "result",
        )
        self.outbox_depth = families.gauge(
            "cts_dicom_outbox_depth", "Structured reports waiting in the outbox for a destination"
        )
        self.audit_pending = families.gauge(
            "cts_dicom_audit_pending",
            "Audit rows of the DICOM door waiting to be written to the registry",
        )
        self.audit_rows_lost = families.counter(
            "cts_dicom_audit_rows_lost",
            "Audit rows of the DICOM door that could not be written (see the log)",
        )
        families.show_at_zero(self.associations, ["accepted", "rejected"])
        families.show_at_zero(self.reports, DESTINATION_KINDS, ["delivered", "failed"])

    def association(self, *, accepted: bool) -> None:
        self.associations.labels("accepted" if accepted else "rejected").inc()

    def instance_received(self) -> None:
        self.instances.inc()

    def study_queued(self) -> None:
        self.studies.inc()

    def study_refused(self, reason: str) -> None:
        """``reason``: a short fixed word (a label value), never anything from the data."""
        self.refused.labels(reason).inc()

    def report_sent(self, kind: str, *, delivered: bool) -> None:
        """``kind``: the destination's kind (a fixed word of the configuration)."""
        self.reports.labels(kind, "delivered" if delivered else "failed").inc()


@functools.cache
def listener_metrics() -> ListenerMetrics:
    """This process's listener metrics, on the default registry (created once)."""
    return ListenerMetrics()

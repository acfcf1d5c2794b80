"""The ``/metrics`` endpoint of one service process, for Prometheus to scrape.

Every service serves its metrics on its own port (``metrics.*_port``), bound to
``metrics.host`` (127.0.0.1 unless the deployment opens it, as containers and pods do).
The endpoint runs on a daemon thread of prometheus_client's small WSGI server; a port that
is taken is logged and the service runs on without metrics, because a screening worker must
not stop over its monitoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from loguru import logger
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from services.core.config import MetricsSettings

# Metric names start with this, so the dashboard and the alert rules find ours.
METRIC_PREFIX = "cts"


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` server."""

    host: str
    port: int
    _server: WSGIServer

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    settings: MetricsSettings,
    *,
    port: int,
    service: str,
    registry: CollectorRegistry = REGISTRY,
) -> MetricsEndpoint | None:
    """Serve ``registry`` on ``settings.host:port`` (0: a free port); None when metrics are
    off or the port cannot be bound."""
    if not settings.enabled:
        return None
    try:
        server, _thread = start_http_server(port, addr=settings.host, registry=registry)
    except OSError as error:
        logger.warning(
            "{} metrics not served on {}:{} ({}); the service runs on without them",
            service,
            settings.host,
            port,
            error,
        )
        return None
    endpoint = MetricsEndpoint(settings.host, int(server.server_port), server)
    logger.info("{} metrics on {}", service, endpoint.url)
    return endpoint

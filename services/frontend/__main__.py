"""``python -m services.frontend``: the web UI of the stack (Gradio) and the REST API behind
sign-in, on 127.0.0.1:7860 unless configured (frontend.host / frontend.port, or
CTS__FRONTEND__HOST / CTS__FRONTEND__PORT); HTTPS with frontend.tls_certificate/tls_key.
"""

from __future__ import annotations

import os
import sys
import threading

# No telemetry from a hospital network (and these machines have no internet anyway).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from loguru import logger

from services.frontend.service import FrontendService
from services.monitoring.runner import ServiceRun, run_service, service_settings, started_or_exit


def main(argv: list[str] | None = None) -> int:
    # Its process prepared first: before anything is written to the storage.
    settings = service_settings("python -m services.frontend", __doc__, argv)

    root = settings.storage.root
    # Gradio keeps uploads here until the study is queued (then they are moved next to it,
    # on the same file system); refused leftovers are swept after a day (see app.py).
    os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "frontend" / "incoming"))
    from services.frontend.server import WebServer, build_server

    # E.g. the registry's schema is not this code's: refused, exit 2.
    service = started_or_exit(lambda: FrontendService(settings))
    app, _access = build_server(service)

    def serve(stop: threading.Event) -> None:
        service.start()
        server = WebServer(app, service)
        try:
            server.start()
            logger.info(
                "frontend {} on {}://{}:{} (registry {}; sign-in {})",
                service.instance_id,
                server.scheme,
                settings.frontend.host,
                settings.frontend.port,
                service.registry.describe(),
                "required" if settings.frontend.sign_in else "OFF",
            )
            stop.wait()
        finally:
            server.stop()
            service.stop()

    run = ServiceRun(
        name="frontend", settings=settings, metrics_port=settings.metrics.frontend_port
    )
    return run_service(run, serve)


if __name__ == "__main__":
    sys.exit(main())

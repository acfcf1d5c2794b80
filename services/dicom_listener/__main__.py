"""``python -m services.dicom_listener``: receive studies from a PACS by DICOM C-STORE, queue
each complete study for screening, and send its structured report back.

Listens on dicom.host:dicom.port (127.0.0.1:11112) as dicom.ae_title (CTS), answers C-ECHO;
settings from configs/config.yaml and CTS__DICOM__* overrides (README, "Connect a PACS").
Exits 2 with the reason when the configuration is wrong (e.g. a destination's secret is
missing, a listener beyond loopback without an allow-list, a TLS file that does not load). Stops cleanly on SIGTERM or Ctrl-C; what it has received or still has to send is
on disk and goes on after the next start.
"""

from __future__ import annotations

import sys
import threading

from loguru import logger

from services.dicom_listener.service import DicomListener
from services.monitoring.runner import ServiceRun, run_service, service_settings, started_or_exit


def main(argv: list[str] | None = None) -> int:
    settings = service_settings("python -m services.dicom_listener", __doc__, argv)
    # A missing secret, an open door, a bad certificate: refused, exit 2.
    listener = started_or_exit(lambda: DicomListener(settings))

    def serve(stop: threading.Event) -> None:
        listener.start()
        destinations = ", ".join(sender.sink.describe() for sender in listener.senders)
        logger.info("structured reports go to: {}", destinations or "no destination configured")
        try:
            stop.wait()
        finally:
            listener.stop()

    run = ServiceRun(
        name="dicom listener", settings=settings, metrics_port=settings.metrics.dicom_listener_port
    )
    return run_service(run, serve)


if __name__ == "__main__":
    sys.exit(main())

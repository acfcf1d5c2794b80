"""How every long-running service's entry point runs (the adapter, the frontend, the DICOM
listener): its files private and its log set-up (``prepare_process``), SIGTERM and Ctrl-C
turned into a clean stop, its ``/metrics`` endpoint, and the endpoint closed however the
service ends.

    def main(argv=None) -> int:
        settings = service_settings("python -m services.dicom_listener", __doc__, argv)
        service = started_or_exit(lambda: DicomListener(settings))  # exit 2 if refused
        return run_service(
            ServiceRun(name="dicom listener", settings=settings,
                       metrics_port=settings.metrics.dicom_listener_port),
            serve=lambda stop: (service.start(), stop.wait(), service.stop()),
        )
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from loguru import logger

from services.core.config import Settings, load_settings
from services.core.errors import ConfigurationError
from services.core.logging_setup import configure_service_logging, route_python_warnings_to_log
from services.monitoring.server import serve_metrics

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What a service writes holds patient data (studies, results, viewers' downloads, the
# registry, logs): folders 0700, files 0600, for this service's user alone.
PRIVATE_UMASK = 0o077
# A service that cannot start with its configuration (a missing secret, an open door, a bad
# certificate, a registry schema that is not this code's) says why and exits with this.
CONFIGURATION_ERROR_EXIT = 2

Service = TypeVar("Service")


def prepare_process(settings: Settings) -> None:
    """The first thing a service process does: every file and folder it creates is its
    user's alone, and its log (Python warnings included) goes where ``settings.logging``
    says."""
    os.umask(PRIVATE_UMASK)
    configure_service_logging(settings.logging)
    route_python_warnings_to_log()


def service_settings(prog: str, description: str | None, argv: list[str] | None) -> Settings:
    """The settings of a service whose only argument is ``--config``, its process prepared."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=None, help="default: configs/config.yaml")
    settings = load_settings(parser.parse_args(argv).config)
    prepare_process(settings)
    return settings


def started_or_exit(build: Callable[[], Service]) -> Service:
    """``build()``; a configuration it refuses is logged and the process exits with
    CONFIGURATION_ERROR_EXIT (SystemExit, as argparse exits on a wrong argument)."""
    try:
        return build()
    except ConfigurationError as error:
        logger.error("not started: {}", error)
        raise SystemExit(CONFIGURATION_ERROR_EXIT) from error


@dataclass
class ServiceRun:
    """One service process: what it is called in the logs, its settings, its metrics port."""

    name: str
    settings: Settings
    metrics_port: int
    # Set by SIGTERM / SIGINT; the service returns from ``serve`` once it is set.
    stop: threading.Event = field(default_factory=threading.Event)
    # Called from the signal handler besides setting ``stop`` (e.g. the adapter's request_stop).
    on_stop: Callable[[], None] | None = None

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        logger.info("signal {} received: stopping", signum)
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop()


def run_service(run: ServiceRun, serve: Callable[[threading.Event], object]) -> int:
    """Run ``serve(stop)`` with the stop signals handled and ``/metrics`` served; 0 after it
    returned (a service that cannot start says why and returns its own code earlier).

    It prepares the process again (idempotent), for an entry point that did not yet."""
    prepare_process(run.settings)
    for signum in STOP_SIGNALS:
        signal.signal(signum, run.request_stop)
    metrics = serve_metrics(run.settings.metrics, port=run.metrics_port, service=run.name)
    try:
        serve(run.stop)
    finally:
        if metrics is not None:
            metrics.close()
    logger.info("{} stopped", run.name)
    return 0

"""One loguru set-up for every entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from loguru import logger

from services.core.config import LoggingSettings

MEGABYTE = 1024 * 1024


def configure_logging(level: str, sink: Callable[[Any], None] | Any = sys.stderr) -> None:
    """Send log lines at ``level`` and above to ``sink``.

    ``diagnose=False``: loguru's default prints the values of local variables in
    tracebacks, which would put file names and DICOM header values (patient names) into
    the logs.
    """
    logger.remove()
    logger.add(sink, level=level.upper(), diagnose=False, backtrace=False)


def configure_service_logging(settings: LoggingSettings) -> None:
    """A service's log: standard error, or ``settings.file``, appended to (a restart keeps
    what the last run wrote) and set aside under a dated name when it reaches
    ``rotation_mb``, the newest ``keep_files`` set-aside files kept. Only the service's own
    lines go there; whatever else reaches its standard error (an interpreter's last
    traceback, a library that prints) stays there (start.sh appends it to <service>.out)."""
    if settings.file is None:
        configure_logging(settings.level)
        return
    settings.file.parent.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.add(
        settings.file,
        level=settings.level.upper(),
        diagnose=False,
        backtrace=False,
        mode="a",
        rotation=int(settings.rotation_mb * MEGABYTE),
        retention=settings.keep_files,
        encoding="utf-8",
    )

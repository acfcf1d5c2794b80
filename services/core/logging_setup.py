"""One loguru set-up for every entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from loguru import logger


def configure_logging(level: str, sink: Callable[[Any], None] | Any = sys.stderr) -> None:
    """Send log lines at ``level`` and above to ``sink``.

    ``diagnose=False``: loguru's default prints the values of local variables in
    tracebacks, which would put file names and DICOM header values (patient names) into
    the logs.
    """
    logger.remove()
    logger.add(sink, level=level.upper(), diagnose=False, backtrace=False)

"""One loguru set-up for every entry point."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from loguru import logger

from services.core.config import LoggingSettings

MEGABYTE = 1024 * 1024
# warnings.catch_warnings saves and restores the process's filters: two threads inside one
# at once can restore each other's state, showing warnings a block meant to hide.
_QUIET_LOCK = threading.Lock()


# Packages whose warnings quote DICOM header values (a patient's name among them).
DICOM_LIBRARIES = frozenset({"pydicom", "highdicom"})


def log_python_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` of every entry point: a Python warning becomes a log line. A
    DICOM library's is logged by its kind and file only: the blocks that hide them
    (``library_warnings_hidden``) change filters that are the whole process's, and another
    thread, or a library's own ``catch_warnings``, can restore them in the middle."""
    if DICOM_LIBRARIES & set(Path(filename).parts):
        logger.warning(
            "{} from {} (its text is not logged)", category.__name__, Path(filename).name
        )
        return
    logger.warning("{}: {}", category.__name__, message)


def route_python_warnings_to_log() -> None:
    warnings.showwarning = log_python_warning


@contextmanager
def library_warnings_hidden() -> Iterator[None]:
    """Hide the warnings of the code inside (pydicom's and highdicom's quote header values,
    a patient's name among them, and patient data stays out of the logs); one thread at a
    time, so that the adapter's stage threads cannot undo each other's."""
    with _QUIET_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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

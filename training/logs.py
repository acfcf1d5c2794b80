"""Logging of the training commands: a console sink for ``python -m training`` and a file
sink per run (``RUN_DIR/train.log``, every epoch at DEBUG)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from loguru import logger

CONSOLE_FORMAT = "{time:HH:mm:ss} | {level: <7} | {message}"
FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def configure_console(level: str = "INFO") -> None:
    """Replace loguru's default sink by a terse one on stderr (the CLI's entry point only).

    ``diagnose=False`` on every sink: loguru's default prints the local variables of each
    frame in a traceback, which may hold embeddings, names or labels.
    """
    logger.remove()
    logger.add(sys.stderr, level=level, format=CONSOLE_FORMAT, backtrace=False, diagnose=False)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Everything logged inside also goes to ``path`` (appended); the sink is removed after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logger.add(path, level="DEBUG", format=FILE_FORMAT, backtrace=False, diagnose=False)
    try:
        yield
    finally:
        logger.remove(handler)

"""Ending a one-shot process without the interpreter's teardown.

When a process that imported the science stack (1,200 modules) and ran the model returns
from ``main``, CPython frees every module's objects one by one before it exits, and the
operating system then frees the same memory at once. Measured on a 2-core AMD EPYC with
the 300-slice study (``benchmarks/README.md``, "Cold start"): 0.6-0.8 s after the batch's
last file was written, 0.28 s for the imports alone; with ``os._exit`` 0.02 s. For the
batch that is a tenth of its cold start, spent after its work is done.

What the teardown does that matters is done here first, in the order the interpreter
does it: ``threading._shutdown`` (the interpreter's own step: idle thread pools are woken,
then every thread that is not a daemon is joined, again until none is left), the ``atexit``
handlers (temporary folders registered with ``weakref.finalize``, the ``logging`` module's
handlers), loguru's sinks closed (its log file is flushed), and standard output and error
flushed. The multiprocessing module ends its child processes the same way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

from loguru import logger

# The status CPython itself exits with when standard output cannot be flushed at exit.
UNFLUSHED_OUTPUT_STATUS = 120


def _flush_standard_streams() -> bool:
    """False when standard output could not be written (a closed pipe); a stream closed by
    the program is skipped, as the interpreter skips it."""
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:
            continue
        try:
            stream.flush()
        except OSError:
            flushed = flushed and stream is not sys.stdout
    return flushed


def exit_without_teardown(status: int) -> NoReturn:
    """Finish what the interpreter's exit would, then end the process with ``status``.

    Only for the end of a command's ``__main__``: nothing may run after it, and callers
    that import ``main`` (tests) keep the normal exit.
    """
    # Private, like atexit._run_exitfuncs: the interpreter's own steps, in its order.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    logger.remove()  # closes every sink, waiting for queued messages
    if not _flush_standard_streams() and status == 0:
        status = UNFLUSHED_OUTPUT_STATUS
    os._exit(status)

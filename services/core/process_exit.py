"""Ending a one-shot process without the interpreter's teardown.

When a process that imported the science stack (1,200 modules) and ran the model returns
from ``main``, CPython frees every module's objects one by one before it exits, and the
operating system then frees the same memory at once. Measured on a 2-core AMD EPYC with
the 300-slice study (``benchmarks/README.md``, "Cold start"): 0.6-0.8 s after the batch's
last file was written, 0.28 s for the imports alone; with ``os._exit`` 0.02 s. For the
batch that is a tenth of its cold start, spent after its work is done.

What the teardown does that matters is done here first, in the order the interpreter
does it: threads that are not daemons are joined, the ``atexit`` handlers run (temporary
folders registered with ``weakref.finalize``, the ``logging`` module's handlers), loguru's
sinks are closed (its log file is flushed), and standard output and error are flushed.
The multiprocessing module ends its child processes the same way.
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
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or a closed stream
            flushed = False
    return flushed


def exit_without_teardown(status: int) -> NoReturn:
    """Finish what the interpreter's exit would, then end the process with ``status``.

    Only for the end of a command's ``__main__``: nothing may run after it, and callers
    that import ``main`` (tests) keep the normal exit.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # the handlers the interpreter would run (a private function)
    logger.remove()  # closes every sink, waiting for queued messages
    if not _flush_standard_streams() and status == 0:
        status = UNFLUSHED_OUTPUT_STATUS
    os._exit(status)

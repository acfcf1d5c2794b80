"""Process-wide memory policy of the batch and adapter processes.

glibc returns large freed blocks (each volume, each model input) to the kernel at once, so
the next study gets fresh pages and pays their first touch again: on the virtual machines
this stack runs on that is about a second per GB, several tenths of a second per study.
Keeping freed memory in the process (no mmap for large blocks, no trimming of the heap)
lets the next study reuse the pages of the previous one. The same as starting the process
with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> MALLOC_ARENA_MAX=1``.

One arena for every thread: the adapter runs each study on a new thread, and glibc serves
a large block for a thread of its own arena with mmap whatever M_MMAP_MAX says (its heaps
are at most 64 MB), then unmaps it when freed. Measured on a 300-slice study run on a new
thread each time: preprocessing 0.49-0.53 s instead of 0.29-0.36 s on the main thread.

The policy must come before any thread but the main one allocates. M_ARENA_MAX stops new
arenas, but an arena made before it stays, and glibc gives a new thread an arena from its
list of free ones (those whose threads have ended) before it looks at the cap: every study
thread then gets that arena, and with it mmap for each large block. Importing the adapter's
modules makes such an arena (malloc_info: 2 after ``import services.adapter.consumer``);
with the policy after them, each study's preprocessing touched its 400 MB afresh
(2026-12-06, a 2-core EPYC: 106,000 minor faults, 0.26-0.96 s instead of 0.13-0.15 s). The
entry points apply it before their heavy imports, and it warns when an arena besides the
main one exists already.

numpy's huge pages: numpy advises the kernel to back each array of 4 MB or more with 2 MB
pages. On these virtual machines (free page reporting hands freed memory back to the host)
finding those pages made a new process's first volume and model input cost 1.4-1.9 s
instead of 0.55 s, while later studies, which reuse kept memory, gain at most 6% from them.
The advice is off unless configured (``memory.numpy_huge_pages``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib

from loguru import logger

from services.core.config import MemorySettings

ARENA_TAG = b"<heap nr="  # one per arena in glibc's malloc_info XML

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes


def _c_library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse; False where the C library is not glibc."""
    libc = _c_library()
    if libc is None:
        return False
    try:
        return all(
            libc.mallopt(parameter, value)
            for parameter, value in (
                (M_ARENA_MAX, 1),
                (M_MMAP_MAX, 0),
                (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            )
        )
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


def malloc_arenas() -> int | None:
    """How many arenas glibc's allocator has made in this process (its ``malloc_info``
    report); None where the C library is not glibc."""
    libc = _c_library()
    if libc is None or not hasattr(libc, "malloc_info"):
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return None
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)  # sets buffer and size
    try:
        return ctypes.string_at(buffer.value or 0, size.value).count(ARENA_TAG)
    finally:
        libc.free(buffer)


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim``); False
    where the C library is not glibc. For a process that kept freed memory and is about to
    leave the machine to others (the cold-start benchmark before it starts new batches)."""
    libc = _c_library()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:  # not glibc
        return False
    return True


def advise_numpy_huge_pages(enabled: bool) -> bool:
    """Set whether numpy advises huge pages for the large arrays it allocates from now on.
    Returns whether the switch was set: False where this numpy has none. numpy documents the
    switch (and its environment variable NUMPY_MADVISE_HUGEPAGE, read only at import) under
    "Global state"."""
    # numpy 2 moved the module to numpy._core; 1.26 has both names.
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            switch = getattr(importlib.import_module(name), "_set_madvise_hugepage", None)
        except ImportError:
            continue
        if switch is not None:
            switch(enabled)
            return True
    return False


def apply_memory_settings(settings: MemorySettings) -> bool:
    """Apply the configured policy at process start, before numpy is imported or any thread
    started (module docstring); True when freed memory is now kept."""
    kept = False
    if settings.keep_freed_memory:
        arenas = malloc_arenas()
        kept = keep_freed_memory()
        if not kept:
            logger.info("memory.keep_freed_memory: not supported by this C library, ignored")
        elif arenas is not None and arenas > 1:
            logger.warning(
                "memory.keep_freed_memory applied after a thread made the allocator's arena "
                "number {}: new threads still get arenas of their own, whose large blocks go "
                "back to the kernel when freed (apply it before numpy is imported)",
                arenas,
            )
    # Imports numpy, whose BLAS starts threads: after the arenas are settled.
    if not advise_numpy_huge_pages(settings.numpy_huge_pages):
        logger.info("memory.numpy_huge_pages: this numpy has no switch for it, ignored")
    return kept

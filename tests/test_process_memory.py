"""The batch's and adapters' memory policy: freed memory stays in the process for reuse."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

GLIBC_ON_LINUX = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="needs Linux /proc and glibc",
)

# Allocates and frees 256 MiB on the main thread, then on each of 4 threads in turn (an
# adapter's studies), and reports the resident size before, during and after each. argv:
# the policy ("keep" or "release") and whether a thread allocated before it ("late": as
# a thread started by an import does; "first": the policy first, as the entry points do).
PROBE = """
import json, sys, threading
from loguru import logger
from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

if sys.argv[2] == "late":
    early = threading.Thread(target=lambda: bytearray(2**20))
    early.start()
    early.join()
warnings = []
logger.add(warnings.append, level="WARNING", format="{message}")
kept = apply_memory_settings(MemorySettings(keep_freed_memory=sys.argv[1] == "keep"))
import numpy as np

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def allocate_and_free(sizes):
    before = rss_mib()
    block = np.ones(256 * 2**20, dtype=np.uint8)
    during = rss_mib()
    del block
    sizes.append({"before": before, "during": during, "after": rss_mib()})

sizes = []
allocate_and_free(sizes)  # on the main thread
for _ in range(4):  # as an adapter's studies, each on a new thread
    worker = threading.Thread(target=allocate_and_free, args=(sizes,))
    worker.start()
    worker.join()
print(json.dumps({"kept": kept, "main": sizes[0], "threads": sizes[1:], "warnings": warnings}))
"""


def probe(policy: str, order: str = "first") -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, policy, order],
        capture_output=True,
        text=True,
        check=True,
    )
    return cast(dict[str, Any], json.loads(completed.stdout))


def fresh_mib(sizes: dict[str, float]) -> float:
    """What an allocation added to the resident size: pages touched for the first time."""
    return sizes["during"] - sizes["before"]


@GLIBC_ON_LINUX
def test_freed_memory_is_kept_only_when_configured() -> None:
    kept = probe("keep")
    released = probe("release")
    assert kept["kept"] is True
    assert released["kept"] is False
    assert kept["warnings"] == released["warnings"] == []
    # Default glibc maps a 256 MiB block freshly for each allocation and gives it back to the
    # kernel when it is freed, on the main thread and on any other.
    for sizes in [released["main"], *released["threads"]]:
        assert fresh_mib(sizes) > 200
        assert sizes["during"] - sizes["after"] > 200
    # With the policy on, the main thread's freed block stays in the process ...
    assert fresh_mib(kept["main"]) > 200
    assert kept["main"]["during"] - kept["main"]["after"] < 16
    # ... and every later study, each on a thread of its own as in the adapter, reuses those
    # pages instead of touching new ones.
    for sizes in kept["threads"]:
        assert fresh_mib(sizes) < 16
        assert sizes["during"] - sizes["after"] < 16


@GLIBC_ON_LINUX
def test_the_policy_after_a_thread_allocated_is_named_in_a_warning() -> None:
    # That thread's arena stays, and glibc gives it to every later thread: each study maps
    # its blocks afresh (the adapter did so while it applied the policy after its imports).
    late = probe("keep", "late")
    assert late["kept"] is True
    assert len(late["warnings"]) == 1
    assert "arena number 2" in late["warnings"][0]
    for sizes in late["threads"]:
        assert fresh_mib(sizes) > 200


@pytest.mark.parametrize("entry", ["services.adapter.__main__", "services.batch.__main__"])
def test_the_entry_points_allocate_on_no_other_thread_before_the_memory_policy(
    entry: str,
) -> None:
    # Both apply the policy in main() before they import the pipeline (and numpy).
    script = (
        f"import sys, {entry}\n"
        "from services.core.process_memory import malloc_arenas\n"
        "print(malloc_arenas(), 'numpy' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    arenas, numpy_imported = completed.stdout.split()
    assert numpy_imported == "False"
    assert arenas in ("1", "None")  # None: not glibc


def test_off_is_a_no_op() -> None:
    assert apply_memory_settings(MemorySettings(keep_freed_memory=False)) is False


# Allocates a 64 MiB array after the policy is applied and prints whether the kernel was
# advised to back it with huge pages: "hg" in the VmFlags of the mapping that holds it.
HUGE_PAGE_PROBE = """
import json, sys
import numpy as np
from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

apply_memory_settings(MemorySettings.model_validate(json.loads(sys.argv[1])))
block = np.ones(64 * 2**20, dtype=np.uint8)
address = block.ctypes.data + block.nbytes // 2  # numpy advises from the first whole page on
inside = False
for line in open("/proc/self/smaps"):
    first = line.split()[0]
    if "-" in first and ":" not in first:
        start, end = (int(part, 16) for part in first.split("-"))
        inside = start <= address < end
    elif inside and first == "VmFlags:":
        print(json.dumps("hg" in line.split()[1:]))
        break
"""


def advised_huge_pages(settings: dict[str, bool]) -> bool:
    completed = subprocess.run(
        [sys.executable, "-c", HUGE_PAGE_PROBE, json.dumps(settings)],
        capture_output=True,
        text=True,
        check=True,
    )
    return bool(json.loads(completed.stdout))


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
    reason="needs a Linux kernel with transparent huge pages",
)
@pytest.mark.parametrize("keep_freed_memory", [True, False])
def test_numpy_asks_for_huge_pages_only_when_configured(keep_freed_memory: bool) -> None:
    # Off by default: on virtual machines that hand freed memory back to their host the
    # advice made a new process's first volume cost seconds (services/core/process_memory.py).
    assert not advised_huge_pages({"keep_freed_memory": keep_freed_memory})
    assert advised_huge_pages({"keep_freed_memory": keep_freed_memory, "numpy_huge_pages": True})


RELEASE_PROBE = """
import json
import numpy as np
from services.core.process_memory import keep_freed_memory, release_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

keep_freed_memory()
block = np.ones(256 * 2**20, dtype=np.uint8)
del block
kept = rss_mib()
released = release_freed_memory()
print(json.dumps({"kept": kept, "after": rss_mib(), "released": released}))
"""


@GLIBC_ON_LINUX
def test_kept_memory_is_handed_back_on_request() -> None:
    # The cold-start benchmark does this before it starts new batches.
    completed = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True
    )
    sizes = json.loads(completed.stdout)
    assert sizes["released"] is True
    assert sizes["kept"] - sizes["after"] > 200

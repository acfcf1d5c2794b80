"""The batch's and adapters' memory policy: freed memory stays in the process for reuse."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

GLIBC_ON_LINUX = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="needs Linux /proc and glibc",
)

# Allocates and frees 256 MiB, then reports the resident size before, during and after.
PROBE = """
import json, sys, threading
import numpy as np
from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

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

kept = apply_memory_settings(MemorySettings(keep_freed_memory=sys.argv[1] == "keep"))
sizes = []
allocate_and_free(sizes)  # on the main thread
worker = threading.Thread(target=allocate_and_free, args=(sizes,))  # as an adapter's study
worker.start()
worker.join()
print(json.dumps({"kept": kept, "main": sizes[0], "thread": sizes[1]}))
"""


def probe(policy: str) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True
    )
    return json.loads(completed.stdout)


@GLIBC_ON_LINUX
def test_freed_memory_is_kept_only_when_configured() -> None:
    kept = probe("keep")
    released = probe("release")
    assert kept["kept"] is True
    assert released["kept"] is False
    # Default glibc maps a 256 MiB block freshly for each allocation and gives it back to the
    # kernel when it is freed, on the main thread and on any other.
    for where in ("main", "thread"):
        sizes = released[where]
        assert sizes["during"] - sizes["before"] > 200
        assert sizes["during"] - sizes["after"] > 200
    # With the policy on, the main thread's freed block stays in the process ...
    assert kept["main"]["during"] - kept["main"]["before"] > 200
    assert kept["main"]["during"] - kept["main"]["after"] < 16
    # ... and the next study, on a thread of its own as in the adapter, reuses those pages
    # instead of touching new ones.
    assert kept["thread"]["during"] - kept["thread"]["before"] < 16
    assert kept["thread"]["during"] - kept["thread"]["after"] < 16


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

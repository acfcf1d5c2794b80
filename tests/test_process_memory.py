"""The batch's and adapters' memory policy: freed memory stays in the process for reuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and glibc")
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

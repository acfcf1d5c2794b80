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
import json, sys
import numpy as np
from services.core.config import MemorySettings
from services.core.process_memory import apply_memory_settings

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

kept = apply_memory_settings(MemorySettings(keep_freed_memory=sys.argv[1] == "keep"))
before = rss_mib()
block = np.ones(256 * 2**20, dtype=np.uint8)
during = rss_mib()
del block
print(json.dumps({"kept": kept, "before": before, "during": during, "after": rss_mib()}))
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
    assert kept["kept"] is True and released["kept"] is False
    for run in (kept, released):
        assert run["during"] - run["before"] > 200  # the block was really touched
    # Default glibc gives a 256 MiB block back to the kernel when it is freed ...
    assert released["during"] - released["after"] > 200
    # ... with the policy on, the pages stay for the next study.
    assert kept["during"] - kept["after"] < 16


def test_off_is_a_no_op() -> None:
    assert apply_memory_settings(MemorySettings(keep_freed_memory=False)) is False

"""Timing and peak memory of one stage, and a description of the machine.

Peak memory is measured two ways and the larger is reported:

* resident set size (RSS) from the kernel: before a stage the peak counter (VmHWM) is reset
  through ``/proc/self/clear_refs``, after it the stage adds ``VmHWM - RSS at the start``.
  This sees every allocation, onnxruntime's native ones included, but not memory an
  allocator reuses from an earlier stage;
* tracemalloc's peak of Python and numpy allocations during the stage (numpy reports its
  buffers to tracemalloc), which sees reused memory too. tracemalloc slows Python code, so
  it runs only in the untimed warm-up pass.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS


def _status_mib(field_name: str) -> float:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{PROC_STATUS} has no {field_name}")
    return int(match.group(1)) / 1024.0


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS counter; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


@dataclass
class StageSamples:
    """Every measurement of one stage: wall seconds and peak RSS added (MiB)."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def max_peak_mib(self) -> float:
        return max(self.peak_mib)


@dataclass
class StageRecorder:
    """Collects StageSamples by stage name; ``timed=False`` records memory only (warm-up)."""

    stages: dict[str, StageSamples] = field(default_factory=dict)
    timed: bool = True
    peak_reset_works: bool = True

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        gc.collect()
        traced = not self.timed
        if traced:
            tracemalloc.start()
        self.peak_reset_works = reset_peak_rss() and self.peak_reset_works
        start_rss = rss_mib()
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            added = max(peak_rss_mib() - start_rss, 0.0)
            if traced:
                added = max(added, tracemalloc.get_traced_memory()[1] / 2**20)
                tracemalloc.stop()
        samples = self.stages.setdefault(name, StageSamples())
        samples.peak_mib.append(added)
        if self.timed:
            samples.seconds.append(seconds)


@dataclass(frozen=True)
class Machine:
    cpu: str
    logical_cores: int
    physical_cores: int
    ram_gib: float
    system: str
    load_average: tuple[float, float, float]

    def describe(self) -> str:
        load = ", ".join(f"{value:.1f}" for value in self.load_average)
        return (
            f"{self.cpu}, {self.physical_cores} physical / {self.logical_cores} logical cores, "
            f"{self.ram_gib:.0f} GiB RAM, {self.system}; load average at the start {load}"
        )


def machine() -> Machine:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    cores = {
        (physical, core)
        for physical, core in re.findall(
            r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$", cpuinfo, re.MULTILINE | re.DOTALL
        )
    }
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return Machine(
        cpu=names[0].strip() if names else platform.processor() or "unknown CPU",
        logical_cores=os.cpu_count() or 1,
        physical_cores=len(cores) or os.cpu_count() or 1,
        ram_gib=int(total.group(1)) / 2**20 if total else 0.0,
        system=f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        load_average=os.getloadavg(),
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    times = os.times()
    return times.user + times.system

"""What the benchmarks share: peak memory per stage, the machine, CPU load, a local Triton.

A stage's peak memory is the larger of (a) the peak resident set size it adds (the kernel's
VmHWM, reset through ``/proc/self/clear_refs`` when the stage begins; sees native memory
such as onnxruntime's, not memory reused from an earlier stage) and (b) tracemalloc's peak
of Python and numpy allocations (sees reused memory; slows Python, so only in untimed
passes, ``traced=True``).
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.pipeline import PipelineEvents
from services.core.schemas import StudyReport
from services.triton.local_server import LocalTritonServer, free_local_ports

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
MIB = 2**20


def status_mib(field_name: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    match = re.search(rf"^{field_name}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{PROC_STATUS} has no {field_name}")
    return int(match.group(1)) / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS counter; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK_RSS)
    except OSError:
        return False
    return True


class StageMemory(PipelineEvents):
    """Peak memory each named stage adds (MiB), the largest reading per stage in ``peaks``.

    Pass it as ``events`` to ``process_input``: every ``stage_started`` ends the running
    stage and begins the next, ``study_finished`` ends the last. Outside the pipeline,
    ``with memory.stage(name)`` measures any other step the same way.
    """

    def __init__(self, *, traced: bool) -> None:
        self.traced = traced
        self.peaks: dict[str, float] = {}
        self._current: str | None = None
        self._start_rss = 0.0

    def begin(self, name: str) -> None:
        self.end()
        gc.collect()  # garbage of the previous stage is not this stage's memory
        if self.traced:
            tracemalloc.start()
        reset_peak_rss()
        self._start_rss = status_mib("VmRSS")
        self._current = name

    def end(self) -> None:
        if self._current is None:
            return
        added = max(status_mib("VmHWM") - self._start_rss, 0.0)
        if self.traced:
            added = max(added, tracemalloc.get_traced_memory()[1] / MIB)
            tracemalloc.stop()
        self.peaks[self._current] = max(self.peaks.get(self._current, 0.0), added)
        self._current = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def stage_started(self, stage: str, *, study_index: int, n_studies: int) -> None:
        self.begin(stage)

    def study_finished(self, report: StudyReport, *, study_index: int, n_studies: int) -> None:
        self.end()


@dataclass
class StageSamples:
    """Every measurement of one stage: wall seconds (timed passes) and peak MiB added."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max_peak_mib(self) -> float:
        return max(self.peak_mib)


def table_row(*cells: str) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def summary(seconds: list[float]) -> dict[str, float]:
    """Runs, median, fastest and slowest of a list of timings (JSON-ready)."""
    return {
        "runs": len(seconds),
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
    }


@dataclass(frozen=True)
class Machine:
    description: str  # CPU, cores, RAM, system, load average at the start
    logical_cores: int
    physical_cores: int


def machine() -> Machine:
    def read(path: str, pattern: str, flags: int = re.MULTILINE) -> list[Any]:
        text = Path(path).read_text() if Path(path).exists() else ""
        return re.findall(pattern, text, flags)

    names = read("/proc/cpuinfo", r"^model name\s*:\s*(.+)$")
    pairs = r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$"
    physical = len(set(read("/proc/cpuinfo", pairs, re.MULTILINE | re.DOTALL)))
    logical = os.cpu_count() or 1
    ram = sum(int(kb) for kb in read("/proc/meminfo", r"^MemTotal:\s+(\d+) kB")) / 2**20
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    cpu = names[0].strip() if names else platform.processor() or "unknown CPU"
    description = (
        f"{cpu}, {physical or logical} physical / {logical} logical cores, {ram:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average at the start {load}"
    )
    return Machine(description, logical, physical or logical)


def local_triton(repository: Path, log_file: Path) -> LocalTritonServer:
    """A tritonserver (nvidia-pytriton's) for ``repository`` on free local ports; use it
    as a context manager (or ``start``/``stop``)."""
    http, grpc, metrics = free_local_ports(3)
    return LocalTritonServer(
        repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=log_file
    )


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants (living ones,
    plus the children they have waited for)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in members:
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of all cores busy between two ``cpu_times`` readings, 0..1."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else 0.0

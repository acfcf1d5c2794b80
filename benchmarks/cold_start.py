"""Cold start (README: "Cold start"): a new process's first study, and Triton's model load.

* The batch over one study, from process start to its row: ``python -m services.batch``
  in a new process, timed from its start to its exit (the row is written at the end), with
  the cached optimised graph (the default), and with ``inference.onnx_graph_cache: false``
  (every start optimises the 725 MB graph again, as before the cache), alternating; the
  first start after the cache is cleared (optimise and save) is timed too. Each run's
  core-seconds and minor page faults (pages touched for the first time) are the child's
  own (``os.wait4``), and a probe measures what one such fault costs a new process here:
  together the part of a cold start that is the machine mapping fresh memory.
* Paired with the warm encoder: with ``warm_encoder`` (a warm run in a process of its own,
  benchmarks/warm_encoder.py), each round runs it once just before the cached start, so
  that each cold start has a warm run from the same moment. On a shared host the ratio of
  medians taken minutes apart moves by more than a change can gain; the overhead of each
  pair (cold minus warm) moves less.
* Every start comes after a pause (``SETTLE_S``) in which nothing runs: these virtual
  machines hand memory a process frees back to their host about 2 s after it is freed, and
  a start right after another process exits finds its pages still backed (a one-study
  batch 6.3-6.9 s back to back, 7.5-7.9 s after 12 s idle, numpy's huge pages on). A batch
  started by a person meets the machine after such a pause.
* Triton's model load: a local tritonserver (python flavour) from start to ready, once
  after the cache is cleared (it optimises and saves) and once from the cached graph.

The adapter's first study is measured where the stack starts (`benchmarks.stack`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import PROJECT_ROOT
from benchmarks.limit import Timing
from benchmarks.measure import local_triton, status_mib
from services.core.inference.optimised_graphs import CACHE_FOLDER
from services.core.process_memory import release_freed_memory

# Longer than the kernel's 2 s delay before it reports freed pages to the host
# (mm/page_reporting.c), so that no start reuses the pages of the process before it.
SETTLE_S = 5.0


def clear_graph_caches(repository: Path) -> int:
    """Remove every saved optimised graph of the repository's models; how many folders."""
    folders = list(Path(repository).glob(f"*/*/{CACHE_FOLDER}"))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)


@dataclass(frozen=True)
class ProcessRun:
    wall_s: float
    cpu_s: float
    stages: dict[str, float] = field(default_factory=dict)  # the report's stage clock
    # The kernel's count of pages the process touched for the first time (its minor page
    # faults). Not its peak resident size: for a child forked from a large process (this
    # one, holding a warm encoder) the kernel reports the parent's size from before exec.
    minor_faults: int = 0

    @property
    def pipeline_s(self) -> float:
        return sum(self.stages.values())


def _run_child(command: list[str], environment: dict[str, str], log: Path) -> ProcessRun:
    """Run ``command``, its output to ``log``; wall time and the child's own resource use
    (``os.wait4``: CPU and minor faults of this child alone)."""
    with log.open("w") as output:
        started = time.perf_counter()
        child = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{command[2:4]} exited {child.returncode}:\n{log.read_text()[-3000:]}")
    return ProcessRun(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        minor_faults=usage.ru_minflt,
    )


def batch_once(study: Path, repository: Path, *, graph_cache: bool) -> ProcessRun:
    """``python -m services.batch STUDY OUT`` in a new process: start to exit, core-seconds."""
    environment = {
        **os.environ,
        "CTS__INFERENCE__MODEL_REPOSITORY": str(repository),
        "CTS__INFERENCE__ONNX_GRAPH_CACHE": "true" if graph_cache else "false",
        "CTS__LOGGING__LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory(prefix="cts-bench-cold-", dir=study.parent) as output:
        log = Path(output) / "batch.out"
        run = _run_child(
            [sys.executable, "-m", "services.batch", str(study), output], environment, log
        )
        if "1 Success" not in log.read_text():
            raise RuntimeError(f"the batch failed:\n{log.read_text()[-3000:]}")
        (report,) = Path(output).glob("json/*.json")
        stages = json.loads(report.read_text())["stage_seconds"]
    return dataclasses.replace(run, stages=stages)


# A new process fills 1 GiB of fresh memory in 4 KiB pages (the batch's memory policy:
# freed memory kept, numpy's huge-page advice off) and prints the seconds it took and its
# minor faults. Where transparent huge pages are "always" the heap gets 2 MB pages and a
# fault costs far more: the cost per fault is then that of a huge page, and the row's
# estimate too high.
FIRST_TOUCH_PROBE = (
    "import resource, time, numpy as np\n"
    "from services.core.config import MemorySettings\n"
    "from services.core.process_memory import apply_memory_settings\n"
    "apply_memory_settings(MemorySettings())\n"
    "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "started = time.perf_counter()\n"
    "np.ones(2**28, dtype=np.float32)\n"
    "seconds = time.perf_counter() - started\n"
    "print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)\n"
)


def first_touch_seconds_per_fault(runs: int = 3) -> float:
    """What this machine charges a new process for a page it touches for the first time
    (the kernel zeroes it; in a virtual machine the host may have to back it too): the
    median over ``runs`` new processes filling 1 GiB, seconds per minor fault."""
    per_fault = []
    for _ in range(runs):
        completed = subprocess.run(
            [sys.executable, "-c", FIRST_TOUCH_PROBE],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds, faults = completed.stdout.split()
        per_fault.append(float(seconds) / max(int(faults), 1))
    return statistics.median(per_fault)


@dataclass
class BatchColdStart:
    first_start: ProcessRun  # the cache cleared: this start optimises and saves
    cached: list[ProcessRun] = field(default_factory=list)
    uncached: list[ProcessRun] = field(default_factory=list)
    first_touch_s_per_fault: float = 0.0  # first_touch_seconds_per_fault, after the runs
    # This process's resident size while the batches ran: what it kept of its earlier work
    # is handed back first (a process holding GBs slowed a new batch here).
    resident_mib: float = 0.0
    settle_s: float = SETTLE_S  # the pause with nothing running before each start
    # The warm encoder run just before each cached run (empty without a warm encoder).
    warm_encoder: list[Timing] = field(default_factory=list)

    def paired_ratios(self) -> list[float]:
        """Each cached start over the warm encoder run of its round."""
        return [
            run.wall_s / warm.wall_s
            for run, warm in zip(self.cached, self.warm_encoder, strict=True)
        ]

    def paired_overheads(self) -> list[float]:
        """Each cached start minus the warm encoder run of its round, seconds."""
        return [
            run.wall_s - warm.wall_s
            for run, warm in zip(self.cached, self.warm_encoder, strict=True)
        ]

    def paired_cpu_overheads(self) -> list[float]:
        """Each cached start's core-seconds minus those of its round's warm encoder run:
        the work of a cold start that is not the encoder's warm run."""
        return [
            run.cpu_s - warm.cpu_s for run, warm in zip(self.cached, self.warm_encoder, strict=True)
        ]

    @staticmethod
    def median_wall(runs: list[ProcessRun]) -> float:
        return statistics.median(run.wall_s for run in runs)

    @staticmethod
    def median_cpu(runs: list[ProcessRun]) -> float:
        return statistics.median(run.cpu_s for run in runs)

    @staticmethod
    def median_stage(runs: list[ProcessRun], stage: str) -> float:
        return statistics.median(run.stages.get(stage, 0.0) for run in runs)

    @staticmethod
    def median_of(runs: list[ProcessRun], attribute: str) -> float:
        """The median of one numeric field of the runs (e.g. minor_faults)."""
        return statistics.median(float(getattr(run, attribute)) for run in runs)

    @staticmethod
    def median_outside(runs: list[ProcessRun]) -> float:
        """Process time outside the pipeline's clock: imports, start-up, writing reports."""
        return statistics.median(run.wall_s - run.pipeline_s for run in runs)


def batch_cold_start(
    study: Path,
    repository: Path,
    rounds: int,
    warm_encoder: Callable[[], Timing] | None = None,
    settle_s: float = SETTLE_S,
) -> BatchColdStart:
    """The first start after the cache is cleared, then ``rounds`` of (cached, uncached) in
    alternating order; ``warm_encoder`` (one warm run, its seconds) is timed just before
    each cached start. Each start waits ``settle_s`` first, with nothing running."""
    clear_graph_caches(repository)
    release_freed_memory()
    time.sleep(settle_s)
    result = BatchColdStart(
        first_start=batch_once(study, repository, graph_cache=True),
        resident_mib=status_mib("VmRSS"),
        settle_s=settle_s,
    )
    for number in range(rounds):
        for cached in (True, False) if number % 2 == 0 else (False, True):
            if cached and warm_encoder is not None:
                result.warm_encoder.append(warm_encoder())
            time.sleep(settle_s)
            run = batch_once(study, repository, graph_cache=cached)
            (result.cached if cached else result.uncached).append(run)
    result.first_touch_s_per_fault = first_touch_seconds_per_fault()
    return result


def triton_load_seconds(repository: Path) -> dict[str, float]:
    """Triton (python flavour) from start to ready: after the cache is cleared ("saved":
    every model optimised and saved) and then from the saved graphs ("cached")."""
    seconds = {}
    clear_graph_caches(repository)
    with tempfile.TemporaryDirectory(prefix="cts-bench-triton-load-") as folder:
        for label in ("saved", "cached"):
            started = time.perf_counter()
            with local_triton(repository, Path(folder) / f"triton-{label}.log"):
                seconds[label] = time.perf_counter() - started
    return seconds

"""Cold start (README: "Cold start"): a new process's first study, and Triton's model load.

* The batch over one study, from process start to its row: ``python -m services.batch``
  in a new process, timed from its start to its exit (the row is written at the end), with
  the cached optimised graph (the default), and with ``inference.onnx_graph_cache: false``
  (every start optimises the 725 MB graph again, as before the cache), alternating; the
  first start after the cache is cleared (optimise and save) is timed too. Each run's
  core-seconds are the child's CPU time.
* Triton's model load: a local tritonserver (python flavour) from start to ready, once
  after the cache is cleared (it optimises and saves) and once from the cached graph.

The adapter's first study is measured where the stack starts (`benchmarks.stack`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import PROJECT_ROOT
from benchmarks.measure import local_triton
from services.core.inference.optimised_graphs import CACHE_FOLDER


def clear_graph_caches(repository: Path) -> int:
    """Remove every saved optimised graph of the repository's models; how many folders."""
    folders = list(Path(repository).glob(f"*/*/{CACHE_FOLDER}"))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return len(folders)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class ProcessRun:
    wall_s: float
    cpu_s: float
    stages: dict[str, float] = field(default_factory=dict)  # the report's stage clock

    @property
    def pipeline_s(self) -> float:
        return sum(self.stages.values())


def batch_once(study: Path, repository: Path, *, graph_cache: bool) -> ProcessRun:
    """``python -m services.batch STUDY OUT`` in a new process: start to exit, core-seconds."""
    environment = {
        **os.environ,
        "CTS__INFERENCE__MODEL_REPOSITORY": str(repository),
        "CTS__INFERENCE__ONNX_GRAPH_CACHE": "true" if graph_cache else "false",
        "CTS__LOGGING__LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory(prefix="cts-bench-cold-", dir=study.parent) as output:
        cpu, started = _children_cpu_seconds(), time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "services.batch", str(study), output],
            cwd=PROJECT_ROOT,
            env=environment,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        if completed.returncode != 0 or "1 Success" not in completed.stdout:
            raise RuntimeError(
                f"the batch failed:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
            )
        (report,) = Path(output).glob("json/*.json")
        stages = json.loads(report.read_text())["stage_seconds"]
    return ProcessRun(wall, _children_cpu_seconds() - cpu, stages)


@dataclass
class BatchColdStart:
    first_start: ProcessRun  # the cache cleared: this start optimises and saves
    cached: list[ProcessRun] = field(default_factory=list)
    uncached: list[ProcessRun] = field(default_factory=list)

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
    def median_outside(runs: list[ProcessRun]) -> float:
        """Process time outside the pipeline's clock: imports, start-up, writing reports."""
        return statistics.median(run.wall_s - run.pipeline_s for run in runs)


def batch_cold_start(study: Path, repository: Path, rounds: int) -> BatchColdStart:
    """The first start after the cache is cleared, then ``rounds`` of (cached, uncached) in
    alternating order."""
    clear_graph_caches(repository)
    result = BatchColdStart(first_start=batch_once(study, repository, graph_cache=True))
    for number in range(rounds):
        for cached in (True, False) if number % 2 == 0 else (False, True):
            run = batch_once(study, repository, graph_cache=cached)
            (result.cached if cached else result.uncached).append(run)
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

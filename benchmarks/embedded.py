"""A study through ``process_input`` in this process, or in a fresh one (README: "End to end").

    .venv/bin/python -m benchmarks.embedded STUDY.zip [--runs N] [--repository DIR]
        [--as-adapter] [--triton-url HOST:PORT]

The command screens one study ``--runs`` times in a new process (as an adapter's task with
``--as-adapter``; the model served by Triton with ``--triton-url``), applying
``memory.keep_freed_memory`` as the batch and the adapters do, and prints JSON: seconds,
stage clocks, resident memory before the first study and its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from loguru import logger

from benchmarks import PROJECT_ROOT
from benchmarks.measure import MIB, status_mib, table_row
from benchmarks.studies import STUDY_300, STUDY_600
from services.core.arrays import ModelInput
from services.core.config import Settings, load_settings
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.model_metadata import read_metadata
from services.core.pipeline import (
    PipelineEvents,
    prepare_studies,
    preprocessing_target,
    process_input,
)
from services.core.pipeline.events import NO_EVENTS
from services.core.process_memory import apply_memory_settings
from services.core.reports import write_reports
from services.core.schemas import ProcessingStatus, StudyReport

FRESH_TITLE = "end to end, fresh process, memory.keep_freed_memory: "
# glibc reads these at start-up; the comparison must come from the setting alone.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def benchmark_settings(repository: Path | None, environ: dict[str, str] | None = None) -> Settings:
    """The configured settings (config file only, unless ``environ`` is given), with
    ``repository`` as the model repository when given."""
    settings = load_settings(environ={} if environ is None else environ)
    if repository is not None:
        settings.inference.model_repository = Path(repository).resolve()
    return settings


def run_study(
    study: Path,
    *,
    backend: InferenceBackend,
    settings: Settings,
    output: Path | None = None,
    events: PipelineEvents = NO_EVENTS,
) -> tuple[float, StudyReport]:
    """A one-study input through ``process_input`` (and ``write_reports`` into ``output``):
    the wall seconds and the report."""
    started = time.perf_counter()
    reports = process_input(
        study, backend=backend, settings=settings, display_name=study.name, events=events
    )
    if output is not None:
        write_reports(reports, output)
    seconds = time.perf_counter() - started
    return seconds, screened(reports[0], study)


def screened(report: StudyReport, study: Path) -> StudyReport:
    """The report of a study that was screened; a Failure row is an error here, because the
    benchmark studies must be screened."""
    if report.processing_status is not ProcessingStatus.SUCCESS or report.quality is None:
        raise RuntimeError(f"{study.name}: {report.failure_reason}")
    return report


def model_input_of(source: Path, settings: Settings) -> ModelInput:
    """The model input of a one-study input (zip or folder), as the pipeline prepares it."""
    target = preprocessing_target(read_metadata(settings.inference.model_repository))
    ready = [
        prepared.model_input
        for prepared in prepare_studies(source, settings=settings, target=target)
        if prepared.model_input is not None
    ]
    if not ready:
        raise RuntimeError(f"{source.name}: no study reached the model input")
    return ready[0]


def _adapter_task(study: Path, backend: InferenceBackend, settings: Settings) -> StudyReport:
    """The study as an adapter's task (report files and previews included); the storage
    root is the study's folder."""
    from services.adapter.held_inputs import HeldInputs
    from services.adapter.model_server_wait import RetryingBackend
    from services.adapter.stages import TaskContext, run_task
    from services.broker.schemas import StudyTask

    settings.storage.root = study.parent
    task = StudyTask(task_id=uuid.uuid4().hex, study_path=study.name, original_filename=study.name)
    waiting = RetryingBackend(
        backend, threading.Event(), backoff=settings.inference.model_server_backoff
    )
    # One adapter alone: its preparation keeps the model input in memory for its model stage.
    context = TaskContext(
        backend=waiting,
        settings=settings,
        adapter_id="benchmark",
        attempt=1,
        held_inputs=HeldInputs(settings.adapter.held_inputs),
    )
    result = run_task(task, context)
    return screened(result.reports[0], study)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--as-adapter", action="store_true", help="run it as an adapter's task")
    parser.add_argument("--triton-url", help="the model served by this Triton (default: here)")
    arguments = parser.parse_args(argv)
    logger.remove()
    settings = benchmark_settings(arguments.repository, environ=dict(os.environ))
    # The batch's and adapters' policy, here after this module's imports: a study's large
    # arrays are made on the main thread, whose arena keeps freed memory all the same
    # (process_memory.py); the warning it may log is about the other threads.
    apply_memory_settings(settings.memory)
    settings.inference.backend = "triton" if arguments.triton_url else "onnxruntime"
    if arguments.triton_url:
        settings.inference.triton_url = arguments.triton_url
        settings.inference.triton_timeout_s = 1800  # a CPU Triton is slow on the full model
    backend = create_backend(settings)
    baseline_rss = status_mib("VmRSS")
    seconds, stages = [], []
    for _ in range(arguments.runs):
        started = time.perf_counter()
        if arguments.as_adapter:
            report = _adapter_task(arguments.study, backend, settings)
        else:
            report = run_study(arguments.study, backend=backend, settings=settings)[1]
        seconds.append(time.perf_counter() - started)
        stages.append(report.stage_seconds)
    # VmHWM, not getrusage: Linux carries ru_maxrss over exec from the parent.
    peak_rss = status_mib("VmHWM")
    memory = {
        "baseline_rss_bytes": round(baseline_rss * MIB),
        "peak_rss_bytes": round(peak_rss * MIB),
    }
    print(json.dumps({"seconds": seconds, "stages": stages, **memory}))
    backend.close()
    return 0


def run_in_fresh_process(
    study: Path,
    runs: int,
    *,
    keep_freed_memory: bool | None = None,
    repository: Path | None = None,
    options: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``python -m benchmarks.embedded`` in a new process (``options`` are its flags), with
    ``memory.keep_freed_memory`` set when given (else as configured)."""
    environment = {key: value for key, value in os.environ.items() if key not in MALLOC_VARIABLES}
    if keep_freed_memory is not None:
        environment["CTS__MEMORY__KEEP_FREED_MEMORY"] = "true" if keep_freed_memory else "false"
    command = [sys.executable, "-m", "benchmarks.embedded", str(study), "--runs", str(runs)]
    if repository is not None:
        command += ["--repository", str(repository)]
    completed = subprocess.run(
        [*command, *options], cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the measured process failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def fresh_process_rows(studies: dict[str, Path], repository: Path, *, quick: bool) -> list[str]:
    """process_input in fresh processes, memory.keep_freed_memory off and on, alternating."""
    runs, rounds = (2, 1) if quick else (4, 2)
    first: dict[tuple[bool, str], list[float]] = {}
    later: dict[tuple[bool, str], list[float]] = {}
    for name, study in studies.items():
        for round_number in range(rounds):
            for keep in (False, True) if round_number % 2 == 0 else (True, False):
                print(f"end to end: {name}, keep freed memory {keep} ...", flush=True)
                result = run_in_fresh_process(
                    study.resolve(), runs, keep_freed_memory=keep, repository=repository
                )
                first.setdefault((keep, name), []).append(result["seconds"][0])
                later.setdefault((keep, name), []).extend(result["seconds"][1:])
    notes = (
        f"{rounds} processes each, alternating, x {runs} studies: median of the later "
        "studies (a long-running batch or adapter), and of the first"
    )
    rows = []
    for keep in (False, True):
        cells = [
            f"{statistics.median(later[keep, name]):.2f} s "
            f"(first study {statistics.median(first[keep, name]):.2f} s)"
            if (keep, name) in later
            else "-"
            for name in (STUDY_300.name, STUDY_600.name)
        ]
        setting = "true (the default)" if keep else "false (glibc's default malloc)"
        rows.append(table_row(f"{FRESH_TITLE}{setting}", *cells, "", notes))
    return rows


if __name__ == "__main__":
    sys.exit(main())

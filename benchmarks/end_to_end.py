"""One study through ``process_input`` several times in a fresh process; prints JSON.

    .venv/bin/python -m benchmarks.end_to_end STUDY.zip [--runs N] [--repository DIR]

``benchmarks.run`` starts it alternately with ``memory.keep_freed_memory`` off (glibc's
default malloc) and on (the default: freed memory kept in the process, see
services/core/process_memory.py), through the same setting the batch and the adapters
apply. On virtual machines the first touch of fresh memory costs about a second per GB,
and by default every large numpy array (the 300 MB volume, the preprocessing buffers) is
fresh memory from the kernel, study after study; with the setting the next study reuses
the pages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# glibc reads these at start-up; the comparison must come from the setting alone.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repository", type=Path)
    arguments = parser.parse_args(argv)
    logger.remove()
    from services.core.config import load_settings
    from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
    from services.core.pipeline import process_input
    from services.core.process_memory import apply_memory_settings

    settings = load_settings()
    apply_memory_settings(settings.memory)  # as the batch and the adapters do
    if arguments.repository is not None:
        settings.inference.model_repository = arguments.repository.resolve()
    backend = OnnxRuntimeBackend(settings.inference.model_repository, settings.inference)
    seconds, stages = [], []
    for _ in range(arguments.runs):
        started = time.perf_counter()
        (report,) = process_input(
            arguments.study, backend=backend, settings=settings, display_name=arguments.study.name
        )
        seconds.append(time.perf_counter() - started)
        if report.processing_status.value != "Success":
            raise SystemExit(f"{arguments.study.name}: {report.failure_reason}")
        stages.append(report.stage_seconds)
    print(json.dumps({"seconds": seconds, "stages": stages}))
    return 0


def run_in_subprocess(
    study: Path, runs: int, *, keep_freed_memory: bool, repository: Path | None = None
) -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in MALLOC_VARIABLES}
    environment["CTS__MEMORY__KEEP_FREED_MEMORY"] = "true" if keep_freed_memory else "false"
    command = [sys.executable, "-m", "benchmarks.end_to_end", str(study), "--runs", str(runs)]
    if repository is not None:
        command += ["--repository", str(repository)]
    completed = subprocess.run(
        command, cwd=PROJECT_ROOT, env=environment, check=True, capture_output=True, text=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())

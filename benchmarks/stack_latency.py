"""Per-study latency through the stack (RabbitMQ -> adapter -> Triton -> reply) against the
embedded pipeline (ONNX Runtime in this process) on the same study and model repository.

    .venv/bin/python benchmarks/stack_latency.py [--repository DIR] [--study PATH] [--runs N]

The two modes run interleaved (embedded, stack, stack, embedded, ...) while one adapter
and Triton are up, so a busy shared machine slows both alike. Embedded mode is what the
batch does per study: ``process_input`` and ``write_reports``. The stack's time is submit
to result on the reply queue. Both report their pipeline stages (the reports' own stage
clock), so the difference can be located. Without --repository the configured repository
is used (the full-size demo model after scripts/demo.sh). Needs RabbitMQ on
127.0.0.1:5672 and the nvidia-pytriton wheel. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import tritonclient.grpc as grpcclient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.stack import running_stack  # noqa: E402
from services.core.config import load_settings  # noqa: E402
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from services.core.pipeline import process_input  # noqa: E402
from services.core.process_memory import apply_memory_settings  # noqa: E402
from services.core.reports import write_reports  # noqa: E402

DEFAULT_STUDY = PROJECT_ROOT.parent / "shared" / "fixtures" / "dicom" / "chest_ct_lung_dx_a0002"


def zip_study(source: Path, target: Path) -> Path:
    if source.is_file():
        shutil.copyfile(source, target)
        return target
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, arcname=path.relative_to(source).as_posix())
    return target


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "runs": len(seconds),
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
    }


def stage_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds per pipeline stage over the runs."""
    names = sorted({name for run in runs for name in run})
    return {name: round(statistics.median(run.get(name, 0.0) for run in runs), 4) for name in names}


TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def triton_statistics(
    url: str, since: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Triton's own clock per model: {model: {phase: seconds per request}} for the requests
    since ``since`` (its totals when None: {model: {"count", phase: total seconds}})."""
    client = grpcclient.InferenceServerClient(url)
    try:
        statistics_ = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    totals: dict[str, dict[str, float]] = {}
    for model in statistics_.get("model_stats", []):
        stats = model.get("inference_stats", {})
        totals[model["name"]] = {
            "count": float(stats.get("success", {}).get("count", 0)),
            **{phase: int(stats.get(phase, {}).get("ns", 0)) / 1e9 for phase in TRITON_PHASES},
        }
    if since is None:
        return totals
    per_request = {}
    for name, now in totals.items():
        count = now["count"] - since.get(name, {}).get("count", 0.0)
        if count > 0:
            per_request[name] = {
                phase: round((now[phase] - since.get(name, {}).get(phase, 0.0)) / count, 4)
                for phase in TRITON_PHASES
            }
    return per_request


def measure(study: Path, repository: Path, runs: int, workdir: Path) -> dict[str, object]:
    settings = load_settings(environ={})
    settings.inference.model_repository = repository
    apply_memory_settings(settings.memory)  # as the batch CLI does
    backend = OnnxRuntimeBackend(repository, settings.inference)

    def embedded_once() -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        reports = process_input(study, backend=backend, settings=settings, display_name=study.name)
        write_reports(reports, workdir / "embedded-output")
        elapsed = time.perf_counter() - started
        if reports[0].processing_status.value != "Success":
            raise RuntimeError(f"embedded: {reports[0].failure_reason}")
        return elapsed, reports[0].stage_seconds

    embedded_once()  # warm-up
    embedded: list[float] = []
    embedded_stages: list[dict[str, float]] = []
    stack: list[float] = []
    in_adapter: list[float] = []
    stack_stages: list[dict[str, float]] = []
    with running_stack(study, repository, adapters=1) as client:
        triton_before = triton_statistics(client.settings.inference.triton_url)
        for run in range(runs):
            # ABBA order: neither mode always runs right after the other.
            for mode in ("embedded", "stack") if run % 2 == 0 else ("stack", "embedded"):
                if mode == "embedded":
                    seconds, stages = embedded_once()
                    embedded.append(seconds)
                    embedded_stages.append(stages)
                else:
                    started = time.perf_counter()
                    task_id = client.submit()
                    stack.append(client.wait({task_id})[task_id] - started)
                    result = client.results[task_id]
                    in_adapter.append(result.seconds)
                    stack_stages.append(result.reports[0].stage_seconds)
        triton = triton_statistics(client.settings.inference.triton_url, since=triton_before)
    backend.close()
    overhead = statistics.median(stack) - statistics.median(embedded)
    return {
        "embedded": {**summary(embedded), "stages": stage_medians(embedded_stages)},
        "stack": {
            "submit_to_result": summary(stack),
            "inside_adapter": summary(in_adapter),
            "stages": stage_medians(stack_stages),
            "triton_per_request_s": triton,
        },
        "stack_overhead_median_s": round(overhead, 4),
        "stack_overhead_percent": round(100 * overhead / statistics.median(embedded), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--runs", type=int, default=6)
    arguments = parser.parse_args()
    repository = (
        arguments.repository or load_settings(environ={}).inference.model_repository
    ).resolve()
    with tempfile.TemporaryDirectory(prefix="cts-bench-") as temporary:
        workdir = Path(temporary)
        study = zip_study(arguments.study, workdir / f"{arguments.study.stem}.zip")
        report = {
            "study": arguments.study.name,
            "repository": str(repository),
            **measure(study, repository, arguments.runs, workdir),
        }
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

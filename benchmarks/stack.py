"""The stack (RabbitMQ -> adapters -> Triton -> reply) against embedded mode.

Triton (python flavour) and N adapters run on free ports with a private queue prefix and
storage folder, removed at the end; needs RabbitMQ on 127.0.0.1:5672. ``measure_overhead``
(one adapter, the given model, ABBA-interleaved with embedded mode; also the command) and
``measure_stack`` (latency and throughput on the tiny model); README: "Stack".

    .venv/bin/python -m benchmarks.stack [--repository DIR] [--study ZIP] [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from benchmarks import PROJECT_ROOT
from benchmarks.embedded import benchmark_settings, run_study
from benchmarks.limit import process_cpu_seconds
from benchmarks.measure import busy_share, cpu_times, local_triton, summary, tree_cpu_seconds
from benchmarks.studies import STUDY_300, ensure_studies
from convertation.build_cli import demo_build_command
from services.broker.connection import connect, declare_topology, publish_task
from services.broker.schemas import (
    STAGES,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    decode_message,
)
from services.core.config import Settings, load_settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.process_memory import apply_memory_settings

TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"
TRITON_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class LatencyThroughput:
    mode: str  # "embedded" or "stack, N adapters"
    latencies_s: list[float]
    burst: int
    burst_seconds: float
    cpu_busy: float = 0.0  # machine-wide share of all cores busy during the burst, 0..1

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s)

    @property
    def p95_s(self) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]

    @property
    def studies_per_minute(self) -> float:
        return 60.0 * self.burst / self.burst_seconds


class _StackClient:
    def __init__(self, settings: Settings, storage: Path, study: Path) -> None:
        self.settings = settings
        self.storage = storage
        self.study = study
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.reply_queue = f"{settings.rabbitmq.queue_prefix}.replies.benchmark"
        self.connection = connect(settings.rabbitmq, name="benchmark", give_up_after_s=10)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declare_topology(self.channel, self.topology)
        self.channel.queue_declare(self.reply_queue, durable=True)
        self.results: dict[str, StudyResult] = {}
        # Filled by running_stack: the processes of the path (for their CPU time) and the
        # cold start: Triton's start to ready, each adapter's start to its first result.
        self.pids: dict[str, int] = {}
        self.triton_ready_s = 0.0
        self.first_results_s: list[float] = []

    def submit(self) -> str:
        task_id = uuid.uuid4().hex
        relative = f"uploads/{task_id}/{self.study.name}"
        (self.storage / relative).parent.mkdir(parents=True, exist_ok=True)
        os.link(self.study, self.storage / relative)  # same file system: no 90 MB copy
        task = StudyTask(
            task_id=task_id,
            study_path=relative,
            original_filename=self.study.name,
            reply_to=self.reply_queue,
        )
        publish_task(self.channel, self.topology, task)
        return task_id

    def replies(
        self, task_ids: Collection[str], timeout_s: float
    ) -> Iterator[StudyResult | StudyProgress]:
        """Every message of the reply queue, until a result of each of ``task_ids`` came
        (TimeoutError after ``timeout_s``).

        Results are pushed by the broker to a consumer (no polling: a basic_get loop costs
        the broker and this process CPU that the measured stack would be missing)."""
        waiting = set(task_ids)
        deadline = time.monotonic() + timeout_s
        for method, properties, body in self.channel.consume(
            self.reply_queue, auto_ack=True, inactivity_timeout=1.0
        ):
            if method is not None:
                message = decode_message(body, type_name=properties.type)
                yield message
                if isinstance(message, StudyResult):
                    waiting.discard(message.task_id)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} results did not arrive")
        self.channel.cancel()

    def wait(self, task_ids: set[str], timeout_s: float = 600.0) -> dict[str, float]:
        """perf_counter time at which each task's result arrived."""
        arrived: dict[str, float] = {}
        for message in self.replies(task_ids, timeout_s):
            if isinstance(message, StudyResult) and message.task_id in task_ids:
                report = message.reports[0] if message.reports else None
                if report is None or report.processing_status.value != "Success":
                    raise RuntimeError(f"stack: {message.error or report}")
                arrived[message.task_id] = time.perf_counter()
                self.results[message.task_id] = message
        return arrived

    def latency(self) -> tuple[float, StudyResult]:
        """Submit one task and wait for its result: seconds from submit to result."""
        started = time.perf_counter()
        task_id = self.submit()
        return self.wait({task_id})[task_id] - started, self.results[task_id]

    def close(self) -> None:
        if not self.channel.is_open:
            return  # the broker went away: nothing left to delete through this connection
        topology = self.topology
        for queue in (
            *topology.waiting_lanes(),
            *topology.model_lanes(),
            *(topology.presence_queue(stage) for stage in STAGES),
            topology.registry_queue,
            topology.dead_letter_queue,
            self.reply_queue,
        ):
            self.channel.queue_delete(queue)
        self.channel.exchange_delete(self.topology.task_exchange)
        self.channel.exchange_delete(self.topology.dead_letter_exchange)
        self.connection.close()


@contextmanager
def running_stack(
    study: Path, repository: Path, adapters: int, overrides: Mapping[str, str] | None = None
) -> Iterator[_StackClient]:
    """A local Triton and ``adapters`` adapter processes on free ports with a private queue
    prefix and storage folder, warmed up (one task per adapter); removed on exit.
    ``overrides``: further CTS__ settings of the adapters."""
    with (
        tempfile.TemporaryDirectory(prefix="cts-bench-stack-", dir=study.parent) as folder,
        ExitStack() as stack,
    ):
        workdir = Path(folder)
        storage = workdir / "storage"
        started = time.perf_counter()
        server = stack.enter_context(local_triton(repository, workdir / "triton.log"))
        triton_ready_s = time.perf_counter() - started
        environment = {
            **os.environ,
            "CTS__STORAGE__ROOT": str(storage),
            "CTS__RABBITMQ__QUEUE_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
            "CTS__INFERENCE__MODEL_REPOSITORY": str(repository),
            "CTS__INFERENCE__TRITON_URL": server.grpc_url,
            "CTS__LOGGING__LEVEL": "WARNING",
            # What start.sh gives each adapter: the host's cores shared among the adapters.
            "CTS__INFERENCE__ONNX_INTRA_OP_THREADS": str(threads_per_adapter(adapters)),
            **(overrides or {}),
        }
        spawned = time.perf_counter()
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.adapter",
                    "--adapter-id",
                    f"bench-{index}",
                    "--health-file",
                    str(workdir / f"alive-{index}"),
                ],
                cwd=PROJECT_ROOT,
                env=environment,
            )
            for index in range(adapters)
        ]
        stack.callback(_stop, processes)
        client = _StackClient(load_settings(environ=environment), storage, study)
        stack.callback(client.close)
        # Warm-up: one task per adapter, submitted as they start, so every adapter has
        # connected and loaded; their arrival is each adapter's cold start.
        arrived = client.wait({client.submit() for _ in range(adapters)})
        client.triton_ready_s = triton_ready_s
        client.first_results_s = sorted(at - spawned for at in arrived.values())
        client.pids = {"triton": server.pid or 0}
        client.pids |= {f"adapter-{i + 1}": p.pid for i, p in enumerate(processes)}
        yield client


def threads_per_adapter(adapters: int, cores: int | None = None) -> int:
    """The host's cores shared among the adapters, at least one each (start.sh's rule)."""
    return max(1, (cores or os.cpu_count() or 1) // max(adapters, 1))


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _embedded(repository: Path) -> tuple[Settings, OnnxRuntimeBackend]:
    settings = benchmark_settings(repository)
    return settings, OnnxRuntimeBackend(settings.inference.model_repository, settings.inference)


def embedded_mode(study: Path, repository: Path, runs: int, burst: int) -> LatencyThroughput:
    settings, backend = _embedded(repository)

    def one() -> float:
        return run_study(study, backend=backend, settings=settings)[0]

    one()  # warm-up
    latencies = [one() for _ in range(runs)]
    started, cpu_before = time.perf_counter(), cpu_times()
    for _ in range(burst):
        one()
    seconds, cpu = time.perf_counter() - started, busy_share(cpu_before, cpu_times())
    backend.close()
    return LatencyThroughput("embedded", latencies, burst, seconds, cpu)


def stack_mode(
    study: Path, repository: Path, adapters: int, runs: int, burst: int
) -> LatencyThroughput:
    with running_stack(study, repository, adapters) as client:
        latencies = [client.latency()[0] for _ in range(runs)]
        started, cpu_before = time.perf_counter(), cpu_times()
        arrived = client.wait({client.submit() for _ in range(burst)})
        cpu = busy_share(cpu_before, cpu_times())
        burst_seconds = max(arrived.values()) - started
    label = f"stack, {adapters} adapter{'s' if adapters > 1 else ''}"
    return LatencyThroughput(label, latencies, burst, burst_seconds, cpu)


def measure_stack(
    study: Path, runs: int, burst: int, adapters: tuple[int, ...]
) -> tuple[str, list[LatencyThroughput]]:
    """Embedded and stack results for ``study`` on the tiny demo model, and its label."""
    with tempfile.TemporaryDirectory(prefix="cts-bench-tiny-") as folder:
        repository = Path(folder) / "repository"
        subprocess.run(
            demo_build_command(repository, ctvit_config=TINY_CONFIG),
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
        )
        results = [embedded_mode(study, repository, runs, burst)]
        results += [stack_mode(study, repository, count, runs, burst) for count in adapters]
    return f"tiny demo model ({TINY_CONFIG.relative_to(PROJECT_ROOT)})", results


def triton_statistics(
    url: str, since: dict[str, dict[str, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Triton's own clock per model: {model: {phase: seconds per request}} for the requests
    since ``since`` (its totals when None: {model: {"count", phase: total seconds}})."""
    client = grpcclient.InferenceServerClient(url)
    try:
        model_stats = client.get_inference_statistics(as_json=True).get("model_stats", [])
    finally:
        client.close()
    totals: dict[str, dict[str, float]] = {}
    for model in model_stats:
        stats = model.get("inference_stats", {})
        totals[model["name"]] = {
            "count": float(stats.get("success", {}).get("count", 0)),
            **{phase: int(stats.get(phase, {}).get("ns", 0)) / 1e9 for phase in TRITON_PHASES},
        }
    if since is None:
        return totals
    per_request = {}
    for name, now in totals.items():
        before = since.get(name, {})
        count = now["count"] - before.get("count", 0.0)
        if count > 0:
            per_request[name] = {
                phase: round((now[phase] - before.get(phase, 0.0)) / count, 4)
                for phase in TRITON_PHASES
            }
    return per_request


def stage_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds per pipeline stage over the runs."""
    names = sorted({name for run in runs for name in run})
    return {name: round(statistics.median(run.get(name, 0.0) for run in runs), 4) for name in names}


def measure_overhead(study: Path, repository: Path, runs: int, workdir: Path) -> dict[str, Any]:
    """One adapter against embedded mode, interleaved (ABBA), located by stage and Triton."""
    settings, backend = _embedded(repository)
    # The batch's policy, here after this module's imports: the embedded study's large arrays
    # are made on the main thread, whose arena keeps freed memory all the same
    # (process_memory.py); the warning it may log is about the other threads.
    apply_memory_settings(settings.memory)
    output = workdir / "embedded-output"
    run_study(study, backend=backend, settings=settings, output=output)  # warm-up
    seconds: dict[str, list[float]] = {"embedded": [], "stack": [], "inside adapter": []}
    stages: dict[str, list[dict[str, float]]] = {"embedded": [], "stack": []}
    # Core-seconds per study: this process for embedded mode; the adapter, tritonserver and
    # its python-backend stubs for the stack (RabbitMQ, shared with the machine, is not).
    cpu: dict[str, list[float]] = {"embedded": [], "stack": []}
    with running_stack(study, repository, adapters=1) as client:
        triton_url = client.settings.inference.triton_url
        triton_before = triton_statistics(triton_url)
        path_pids = list(client.pids.values())
        for run in range(runs):
            # ABBA order: neither mode always runs right after the other.
            for mode in ("embedded", "stack") if run % 2 == 0 else ("stack", "embedded"):
                if mode == "embedded":
                    cpu_before = process_cpu_seconds()
                    elapsed, report = run_study(
                        study, backend=backend, settings=settings, output=output
                    )
                    cpu[mode].append(process_cpu_seconds() - cpu_before)
                else:
                    cpu_before = tree_cpu_seconds(path_pids)
                    elapsed, result = client.latency()
                    cpu[mode].append(tree_cpu_seconds(path_pids) - cpu_before)
                    seconds["inside adapter"].append(result.seconds)
                    report = result.reports[0]
                seconds[mode].append(elapsed)
                stages[mode].append(report.stage_seconds)
        triton = triton_statistics(triton_url, since=triton_before)
        cold = {
            "triton_ready_s": client.triton_ready_s,
            "adapter_first_result_s": client.first_results_s[0],
        }
    backend.close()
    overhead = statistics.median(seconds["stack"]) - statistics.median(seconds["embedded"])
    return {
        "embedded": {
            **summary(seconds["embedded"]),
            "stages": stage_medians(stages["embedded"]),
            "cpu_s": summary(cpu["embedded"]),
        },
        "stack": {
            "submit_to_result": summary(seconds["stack"]),
            "cpu_s": summary(cpu["stack"]),
            "cold_start": cold,
            "inside_adapter": summary(seconds["inside adapter"]),
            "stages": stage_medians(stages["stack"]),
            "triton_per_request_s": triton,
        },
        "stack_overhead_median_s": round(overhead, 4),
        "stack_overhead_percent": round(100 * overhead / statistics.median(seconds["embedded"]), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--study", type=Path, help="a zip (default: the 300-slice study)")
    parser.add_argument("--runs", type=int, default=6)
    arguments = parser.parse_args(argv)
    repository = benchmark_settings(arguments.repository).inference.model_repository
    study = arguments.study or ensure_studies((STUDY_300,))[STUDY_300.name]
    with tempfile.TemporaryDirectory(prefix="cts-bench-", dir=study.parent) as workdir:
        result = measure_overhead(study.resolve(), repository, arguments.runs, Path(workdir))
    print(json.dumps({"study": study.name, "repository": str(repository), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

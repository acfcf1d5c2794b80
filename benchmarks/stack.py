"""Per-study latency and throughput through the stack (RabbitMQ -> adapters -> Triton).

One local Triton (python-flavour repository) and N adapter processes are started on free
ports with a private queue prefix and storage folder; everything is stopped and removed at
the end. Latency: tasks submitted one at a time, submit-to-result time, p50 and p95.
Throughput: ``burst`` tasks submitted at once, tasks per minute until the last result.
The same is measured for the embedded pipeline (one process, ONNX Runtime in-process) on
the same study and repository.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.broker.connection import connect, declare_topology, publish_task
from services.broker.schemas import QueueTopology, StudyResult, StudyTask, decode_message
from services.core.config import Settings, load_settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.pipeline import process_input
from services.triton.local_server import LocalTritonServer, free_local_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"


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


def stack_available() -> bool:
    return (PROJECT_ROOT / "services" / "adapter" / "__main__.py").is_file() and (
        PROJECT_ROOT / "start.sh"
    ).is_file()


def build_tiny_repository(output: Path) -> Path:
    """The demo repository of the tiny CTViT (the stack's overhead does not depend on it)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "convertation.build_repository",
            "--output",
            str(output),
            "--flavour",
            "python",
            "--demo",
            "--ctvit-config",
            str(TINY_CONFIG),
        ],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )
    return output


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else 0.0


def embedded_mode(study: Path, repository: Path, runs: int, burst: int) -> LatencyThroughput:
    settings = load_settings(environ={})
    settings.inference.model_repository = repository
    backend = OnnxRuntimeBackend(repository, settings.inference)

    def one() -> float:
        started = time.perf_counter()
        (report,) = process_input(
            study, backend=backend, settings=settings, display_name=study.name
        )
        if report.processing_status.value != "Success":
            raise RuntimeError(f"embedded: {report.failure_reason}")
        return time.perf_counter() - started

    one()  # warm-up
    latencies = [one() for _ in range(runs)]
    started, cpu_before = time.perf_counter(), cpu_times()
    for _ in range(burst):
        one()
    seconds, cpu = time.perf_counter() - started, busy_share(cpu_before, cpu_times())
    return LatencyThroughput("embedded", latencies, burst, seconds, cpu)


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

    def wait(self, task_ids: set[str], timeout_s: float = 600.0) -> dict[str, float]:
        """perf_counter time at which each task's result arrived.

        Results are pushed by the broker to a consumer (no polling: a basic_get loop costs
        the broker and this process CPU that the measured stack would be missing)."""
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        for method, properties, body in self.channel.consume(
            self.reply_queue, auto_ack=True, inactivity_timeout=1.0
        ):
            if method is not None:
                message = decode_message(body, type_name=properties.type)
                if isinstance(message, StudyResult) and message.task_id in task_ids:
                    report = message.reports[0] if message.reports else None
                    if report is None or report.processing_status.value != "Success":
                        raise RuntimeError(f"stack: {message.error or report}")
                    arrived[message.task_id] = time.perf_counter()
                    self.results[message.task_id] = message
            if len(arrived) == len(task_ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(task_ids) - len(arrived)} results did not arrive")
        self.channel.cancel()
        return arrived

    def latency(self) -> float:
        """Submit one task and wait for its result: seconds from submit to result."""
        started = time.perf_counter()
        task_id = self.submit()
        return self.wait({task_id})[task_id] - started

    def close(self) -> None:
        if not self.channel.is_open:
            return  # the broker went away: nothing left to delete through this connection
        for queue in (self.topology.task_queue, self.topology.dead_letter_queue, self.reply_queue):
            self.channel.queue_delete(queue)
        self.channel.exchange_delete(self.topology.task_exchange)
        self.channel.exchange_delete(self.topology.dead_letter_exchange)
        self.connection.close()


@contextmanager
def running_stack(
    study: Path, repository: Path, adapters: int, environment: dict[str, str] | None = None
) -> Iterator[_StackClient]:
    """A local Triton and ``adapters`` adapter processes on free ports with a private queue
    prefix and storage folder, warmed up (one task per adapter); removed on exit."""
    with tempfile.TemporaryDirectory(prefix="cts-bench-stack-", dir=study.parent) as folder:
        workdir = Path(folder)
        storage = workdir / "storage"
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        http, grpc, metrics = free_local_ports(3)
        environment = {
            **os.environ,
            **(environment or {}),
            "CTS__STORAGE__ROOT": str(storage),
            "CTS__RABBITMQ__QUEUE_PREFIX": prefix,
            "CTS__INFERENCE__MODEL_REPOSITORY": str(repository),
            "CTS__INFERENCE__TRITON_URL": f"127.0.0.1:{grpc}",
            "CTS__LOGGING__LEVEL": "WARNING",
        }
        settings = load_settings(environ=environment)
        with ExitStack() as stack:
            stack.enter_context(
                LocalTritonServer(
                    repository,
                    http_port=http,
                    grpc_port=grpc,
                    metrics_port=metrics,
                    log_file=workdir / "triton.log",
                )
            )
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
            client = _StackClient(settings, storage, study)
            stack.callback(client.close)
            # Warm-up: one task per adapter, so every adapter has connected and loaded.
            client.wait({client.submit() for _ in range(adapters)})
            yield client


def stack_mode(
    study: Path, repository: Path, adapters: int, runs: int, burst: int
) -> LatencyThroughput:
    with running_stack(study, repository, adapters) as client:
        latencies = [client.latency() for _ in range(runs)]
        started, cpu_before = time.perf_counter(), cpu_times()
        arrived = client.wait({client.submit() for _ in range(burst)})
        cpu = busy_share(cpu_before, cpu_times())
        burst_seconds = max(arrived.values()) - started
    label = f"stack, {adapters} adapter{'s' if adapters > 1 else ''}"
    return LatencyThroughput(label, latencies, burst, burst_seconds, cpu)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def measure_stack(
    study: Path, repository: Path | None, runs: int, burst: int, adapters: tuple[int, ...]
) -> tuple[str, list[LatencyThroughput]]:
    """Embedded and stack results for ``study``; the label says which model was used."""
    with tempfile.TemporaryDirectory(prefix="cts-bench-tiny-") as folder:
        label = "full-size demo model"
        if repository is None:
            repository = build_tiny_repository(Path(folder) / "repository")
            label = "tiny demo model (tests/data/ctvit_tiny.json)"
        results = [embedded_mode(study, repository, runs, burst)]
        for count in adapters:
            results.append(stack_mode(study, repository, count, runs, burst))
        shutil.rmtree(folder, ignore_errors=True)
    return label, results

"""Per-study latency through the stack (RabbitMQ -> adapter -> Triton -> reply) versus the
embedded pipeline (ONNX Runtime in-process), for the same study.

    .venv/bin/python benchmarks/stack_latency.py [--repository DIR] [--study PATH] [--runs N]
        [--transport auto|grpc|shared_memory]

Without --repository the tiny demo repository is built in a temporary folder (the
overhead of the stack does not depend on the model's size; with a full-size repository the
numbers include the real encoder). Needs RabbitMQ on 127.0.0.1:5672 and the
nvidia-pytriton wheel. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pika

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from services.broker.connection import connect, declare_topology  # noqa: E402
from services.broker.schemas import QueueTopology, StudyResult, StudyTask, decode_message  # noqa: E402
from services.core.config import load_settings  # noqa: E402
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from services.core.pipeline import process_input  # noqa: E402
from services.triton.local_server import LocalTritonServer, free_local_ports  # noqa: E402

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
        "mean_s": round(statistics.fmean(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
    }


def embedded(study: Path, repository: Path, runs: int) -> dict[str, float]:
    settings = load_settings(environ={})
    settings.inference.model_repository = repository
    backend = OnnxRuntimeBackend(repository, settings.inference)
    process_input(study, backend=backend, settings=settings, display_name=study.name)  # warm-up
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        reports = process_input(study, backend=backend, settings=settings, display_name=study.name)
        seconds.append(time.perf_counter() - started)
        assert reports[0].processing_status.value == "Success", reports[0].failure_reason
    return summary(seconds)


def through_stack(
    study: Path, repository: Path, runs: int, transport: str, workdir: Path
) -> dict[str, object]:
    settings = load_settings(environ={})
    storage = workdir / "storage"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings.rabbitmq.queue_prefix = prefix
    topology = QueueTopology.from_settings(settings.rabbitmq)
    http, grpc, metrics = free_local_ports(3)
    environment = {
        **os.environ,
        "CTS__STORAGE__ROOT": str(storage),
        "CTS__RABBITMQ__QUEUE_PREFIX": prefix,
        "CTS__INFERENCE__MODEL_REPOSITORY": str(repository),
        "CTS__INFERENCE__TRITON_URL": f"127.0.0.1:{grpc}",
        "CTS__INFERENCE__TRITON_TRANSPORT": transport,
        "CTS__LOGGING__LEVEL": "WARNING",
    }
    reply_queue = f"{prefix}.replies.benchmark"
    with LocalTritonServer(
        repository, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=workdir / "t.log"
    ):
        adapter = subprocess.Popen(
            [sys.executable, "-m", "services.adapter", "--health-file", str(workdir / "alive")],
            cwd=PROJECT_ROOT,
            env=environment,
        )
        connection = connect(settings.rabbitmq, name="benchmark", give_up_after_s=10)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, topology)
            channel.queue_declare(reply_queue, durable=True)
            total, in_adapter = [], []
            for run in range(runs + 1):  # the first run warms the adapter up
                task_id = uuid.uuid4().hex
                relative = f"uploads/{task_id}/{study.name}"
                (storage / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(study, storage / relative)
                task = StudyTask(
                    task_id=task_id,
                    study_path=relative,
                    original_filename=study.name,
                    reply_to=reply_queue,
                )
                started = time.perf_counter()
                channel.basic_publish(
                    topology.task_exchange,
                    "study",
                    task.model_dump_json().encode(),
                    pika.BasicProperties(type="StudyTask", delivery_mode=2, reply_to=reply_queue),
                )
                result = None
                while result is None:
                    method, properties, body = channel.basic_get(reply_queue, auto_ack=True)
                    if method is None:
                        time.sleep(0.002)
                        continue
                    message = decode_message(body, type_name=properties.type)
                    if isinstance(message, StudyResult) and message.task_id == task_id:
                        result = message
                elapsed = time.perf_counter() - started
                assert result.reports[0].processing_status.value == "Success", result.error
                if run:
                    total.append(elapsed)
                    in_adapter.append(result.seconds)
        finally:
            for queue in (topology.task_queue, topology.dead_letter_queue, reply_queue):
                channel.queue_delete(queue)
            channel.exchange_delete(topology.task_exchange)
            channel.exchange_delete(topology.dead_letter_exchange)
            connection.close()
            adapter.terminate()
            adapter.wait(60)
    return {
        "transport": transport,
        "submit_to_result": summary(total),
        "inside_adapter": summary(in_adapter),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--transport", default="auto", choices=("auto", "grpc", "shared_memory"))
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cts-bench-") as temporary:
        workdir = Path(temporary)
        repository = arguments.repository
        if repository is None:
            repository = workdir / "tiny_repository"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "convertation.build_repository",
                    "--output",
                    str(repository),
                    "--flavour",
                    "python",
                    "--demo",
                    "--ctvit-config",
                    str(PROJECT_ROOT / "tests" / "data" / "ctvit_tiny.json"),
                ],
                cwd=PROJECT_ROOT,
                check=True,
                capture_output=True,
            )
        study = zip_study(arguments.study, workdir / f"{arguments.study.stem}.zip")
        report = {
            "study": arguments.study.name,
            "repository": str(arguments.repository or "tiny demo (tests/data/ctvit_tiny.json)"),
            "embedded": embedded(study, repository, arguments.runs),
            "stack": through_stack(study, repository, arguments.runs, arguments.transport, workdir),
        }
        stack = report["stack"]["submit_to_result"]["median_s"]  # type: ignore[index]
        report["stack_overhead_median_s"] = round(stack - report["embedded"]["median_s"], 4)
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real Prometheus (the Debian package) scrapes every /metrics endpoint of the stack that
``./start.sh --local`` runs (frontend, two adapters, Triton, RabbitMQ's Prometheus plugin)
with the repository's scrape config, sees a screened study counted, and answers every query
of the repository's Grafana dashboard.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fault_support import LocalStack, StackPorts, TaskClient, ensure_rabbitmq_running
from sr_support import require_tool
from stack_support import PROJECT_ROOT, delete_topology, wait_for, zip_directory

from services.broker.schemas import PREPARE_STAGE, QueueTopology, TaskStatus
from services.broker.storage import load_result
from services.triton.local_server import free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.slow]

MONITORING = PROJECT_ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "chest-ct-screening.json"
SCRAPE_INTERVAL = "1s"
JOBS = {
    "cts-frontend": 1,
    "cts-adapter": 2,
    "cts-dicom-listener": 1,
    "triton": 1,
    "rabbitmq": 1,
    "rabbitmq-queues": 1,
}


def free_port_run(length: int) -> int:
    """The first of ``length`` consecutive free ports on 127.0.0.1 (adapter N uses P + N - 1)."""
    for _ in range(200):
        (first,) = free_local_ports(1)
        sockets = []
        try:
            for port in range(first, first + length):
                handle = socket.socket()
                sockets.append(handle)
                handle.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for handle in sockets:
                handle.close()
    raise AssertionError(f"no {length} consecutive free ports")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Prometheus:
    """The prometheus binary on a free loopback port, with its own data folder."""

    def __init__(self, binary: str, config: Path, data: Path, log: Path) -> None:
        (self.port,) = free_local_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: see {self._log.name}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def query(self, expression: str) -> list[dict]:
        answer = get_json(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        )
        assert answer["status"] == "success", (expression, answer)
        return answer["data"]["result"]

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def targets(self) -> list[dict]:
        return get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="module")
def stack(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    frontend, http, grpc, triton_metrics, frontend_metrics, dicom_metrics = free_local_ports(6)
    local = LocalStack(
        repository=tiny_model_repository,
        storage=tmp_path_factory.mktemp("metrics-stack") / "storage",
        prefix=f"test-metrics-{uuid.uuid4().hex[:10]}",
        ports=StackPorts(frontend, http, grpc, triton_metrics),
        adapters=2,
        extra_arguments=(
            "--frontend-metrics-port",
            str(frontend_metrics),
            "--adapter-metrics-port",
            str(free_port_run(2)),
            "--dicom-metrics-port",
            str(dicom_metrics),
        ),
    )
    ensure_rabbitmq_running(local.broker)
    try:
        local.start()
        yield local
    finally:
        stopped = local.stop()
        delete_topology(local.broker, [f"{local.prefix}.replies.metrics-test"])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not (local.run_dir / "prometheus").exists()  # stop.sh removes its targets too


def local_scrape_config(storage: Path, target: Path) -> Path:
    """deploy/monitoring/prometheus.local.yml, reading this stack's target files, scraping
    every second."""
    config = yaml.safe_load((MONITORING / "prometheus.local.yml").read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    for job in config["scrape_configs"]:
        for discovery in job["file_sd_configs"]:
            discovery["files"] = [
                str(storage / "run" / "prometheus" / Path(name).name) for name in discovery["files"]
            ]
    target.write_text(yaml.safe_dump(config))
    return target


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """The prometheus binary (checked before the stack starts: see require_tool)."""
    return require_tool("prometheus", "prometheus")


def test_prometheus_scrapes_every_endpoint_and_sees_the_study(
    prometheus_binary: str, stack: LocalStack, fixtures_dir: Path, tmp_path: Path
) -> None:
    topology = QueueTopology(prefix=stack.prefix)
    # A study submitted over AMQP: the adapter counts it, and the frontend counts its result
    # when its recorder writes it into the registry.
    client = TaskClient(stack.broker, stack.storage, f"{stack.prefix}.replies.metrics-test")
    chest = zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", tmp_path / "chest.zip")
    task_id = uuid.uuid4().hex
    study = stack.storage / "uploads" / task_id / "chest.zip"
    study.parent.mkdir(parents=True)
    shutil.copyfile(chest, study)
    task = {
        "schema_version": 1,
        "task_id": task_id,
        "study_path": f"uploads/{task_id}/chest.zip",
        "original_filename": "metrics-chest.zip",
    }
    try:
        client.publish(json.dumps(task).encode(), correlation_id=task_id, message_type="StudyTask")
    finally:
        client.close()
    result = wait_for(lambda: load_result(stack.storage, task_id), 120, "the result stored")
    assert result.status is TaskStatus.COMPLETED

    config = local_scrape_config(stack.storage, tmp_path / "prometheus.yml")
    prometheus = Prometheus(
        prometheus_binary, config, tmp_path / "tsdb", tmp_path / "prometheus.log"
    )
    try:
        wait_for(prometheus.ready, 60, "Prometheus ready")

        def all_up() -> bool:
            targets = prometheus.targets()
            up: dict[str, int] = {}
            for target in targets:
                if target["health"] == "up":
                    up[target["labels"]["job"]] = up.get(target["labels"]["job"], 0) + 1
            return up == JOBS

        wait_for(all_up, 60, f"every target up: {JOBS}", interval_s=0.5)

        def counted(expression: str, expected: float) -> bool:
            return prometheus.value(expression) == expected

        # The frontend counts the result once, after the adapter counted its study once.
        wait_for(
            lambda: counted('sum(cts_frontend_results_total{status="completed"})', 1.0),
            30,
            "the frontend's result counted",
            interval_s=0.5,
        )
        assert prometheus.value('sum(cts_adapter_studies_total{status="Success"})') == 1.0
        assert prometheus.value('sum(cts_adapter_tasks_total{outcome="completed"})') == 1.0
        assert prometheus.value("sum(cts_adapter_tasks_in_progress)") == 0.0
        stages = {
            series["metric"]["stage"]
            for series in prometheus.query("cts_adapter_stage_seconds_count > 0")
        }
        assert {"intake", "volume", "preprocessing", "inference"} <= stages
        model_requests = prometheus.value(
            'sum(cts_adapter_model_request_seconds_count{model="screening", outcome="ok"})'
        )
        assert model_requests == 1.0
        assert prometheus.value("sum(cts_frontend_reply_lag_seconds_count)") == 1.0
        # Triton counted the same request, RabbitMQ shows the stack's empty task queue.
        triton = prometheus.value('sum(nv_inference_request_success{model="chest_screening"})')
        assert triton == 1.0
        depth = prometheus.value(
            f'rabbitmq_detailed_queue_messages_ready{{queue="{topology.task_queue}"}}'
        )
        assert depth == 0.0
        # Adapters alive: each one's preparation stage consumes the presence queue (the
        # lanes themselves are read with basic.get).
        consumers = prometheus.value(
            f'rabbitmq_detailed_queue_consumers{{queue="{topology.presence_queue(PREPARE_STAGE)}"}}'
        )
        assert consumers == 2.0

        # Every dashboard query is valid PromQL here, and the panels that matter have data.
        dashboard = json.loads(DASHBOARD.read_text())
        time.sleep(3)  # a few samples after the study: rates have two points
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expression = target["expr"].replace("$prefix", stack.prefix)
                if not prometheus.query(expression):
                    empty.append((panel["title"], target["legendFormat"]))
        # Without a GPU Triton exports no GPU series; nothing was refused or waited for.
        allowed_empty = {
            ("Triton GPU and CPU utilisation", "GPU {{gpu_uuid}}"),
            ("Frontend", "uploads / min"),
            ("Frontend", "refused / min: {{reason}}"),
        }
        assert set(empty) <= allowed_empty, empty
    finally:
        prometheus.stop()


@pytest.mark.parametrize("name", ["prometheus.local.yml", "prometheus.compose.yml"])
def test_the_repository_scrape_configs_pass_promtool(name: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    checked = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(MONITORING / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""Helpers of the stack tests (adapter, frontend, end-to-end): free ports, zipped fixtures,
waiting, broker clean-up. Not a test module."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.broker.connection import connect, declare_topology
from services.broker.schemas import STAGES, Priority, QueueTopology, StudyTask, decode_message
from services.core.config import RabbitMQSettings, Settings, load_settings
from services.registry import upgrade_registry
from services.triton.local_server import LocalTritonServer, free_local_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def zip_directory(source: Path, target: Path) -> Path:
    """A zip of every file of ``source`` (as a customer sends a study)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, arcname=f"{source.name}/{path.relative_to(source)}")
    return target


def wait_for(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2
) -> T:
    """Poll ``probe`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def delete_topology(settings: RabbitMQSettings, extra_queues: list[str] = ()) -> None:  # type: ignore[assignment]
    """Remove every queue and exchange a test declared under its prefix."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="test cleanup", give_up_after_s=10)
    try:
        channel = connection.channel()
        queues = (
            *topology.waiting_lanes(),
            *topology.model_lanes(),
            *(topology.presence_queue(stage) for stage in STAGES),
            *(topology.doorbell_queue(stage) for stage in STAGES),
            topology.dead_letter_queue,
            topology.registry_queue,
        )
        for queue in (*queues, *extra_queues):
            channel.queue_delete(queue)
        for exchange in (topology.task_exchange, topology.dead_letter_exchange):
            channel.exchange_delete(exchange)
    finally:
        connection.close()


@contextmanager
def stack_settings(storage: Path, name: str) -> Iterator[Settings]:
    """Settings of a test on the real registry and RabbitMQ: the storage root ``storage``, a
    queue prefix of its own (``test-<name>-...``), no metrics, the registry upgraded; what it
    declared on the broker is deleted afterwards. Options that do not touch the registry can be
    set on what it yields."""
    settings = load_settings(environ={})
    settings.storage.root = storage
    settings.rabbitmq.queue_prefix = f"test-{name}-{uuid.uuid4().hex[:10]}"
    settings.metrics.enabled = False
    upgrade_registry(settings)
    try:
        yield settings
    finally:
        delete_topology(settings.rabbitmq)


def take_tasks(settings: RabbitMQSettings, priority: Priority | None = None) -> list[StudyTask]:
    """Take every task waiting in the lane of ``priority`` (every lane, most urgent first, when
    None) off the test's broker, in order; each must be a StudyTask by its AMQP type."""
    topology = QueueTopology.from_settings(settings)
    lanes = topology.task_lanes() if priority is None else [topology.task_lane(priority)]
    connection = connect(settings, name="test task reader", give_up_after_s=10)
    tasks = []
    try:
        channel = connection.channel()
        declare_topology(channel, topology)
        for lane in lanes:
            while (message := channel.basic_get(lane, auto_ack=True))[0] is not None:
                _method, properties, body = message
                tasks.append(decode_message(body, StudyTask, type_name=properties.type))
    finally:
        connection.close()
    return tasks


def triton_server(
    repository: Path, log_file: Path, ports: tuple[int, int, int] | None = None, **options: Any
) -> LocalTritonServer:
    """A tritonserver of ``repository`` (not started) on ``ports``: (http, grpc, metrics), free
    ones when None; ``options`` as LocalTritonServer's."""
    http, grpc, metrics = ports or free_local_ports(3)
    return LocalTritonServer(
        repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        log_file=log_file,
        **options,
    )


@pytest.fixture(scope="module")
def module_triton(tiny_model_repository: Path, tmp_path_factory) -> Iterator[LocalTritonServer]:
    """A tritonserver serving the tiny model repository, one for each test module that takes it
    as a fixture of its own (``triton = module_triton``)."""
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with triton_server(tiny_model_repository, log) as server:
        yield server


def start_service(
    module: str, environment: dict[str, str], *arguments: str, **options: Any
) -> subprocess.Popen:
    """``python -m <module> ARGUMENTS`` of this project as its own process, with this interpreter
    and ``environment``, stdin closed; ``options`` as Popen's (stdout, stderr...)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *arguments],
        env=environment,
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        **options,
    )

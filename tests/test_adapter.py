"""The adapter on real components: RabbitMQ at 127.0.0.1:5672, the tritonserver of the
nvidia-pytriton wheel serving the tiny demo repository, the real DICOM fixtures.

Studies are submitted the way another hospital system would: a JSON body of the documented
schema published with plain pika; results are read from the documented reply queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pika
import pytest
import tritonclient.grpc as grpcclient
from stack_support import (
    PROJECT_ROOT,
    delete_topology,
    module_triton,
    triton_server,
    wait_for,
    zip_directory,
)

from services.adapter.consumer import Adapter
from services.adapter.dead_letters import REASON_HEADER
from services.broker.connection import connect, declare_topology, publish_task
from services.broker.schemas import (
    MODEL_STAGE,
    STAGES,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    decode_message,
)
from services.broker.storage import DELIVERED_MARK, load_result, result_json_path, store_result
from services.core.config import Backoff, Settings, load_settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.inference.triton_backend import TritonBackend
from services.core.pipeline import process_input
from services.core.schemas import ProcessingStatus
from services.triton.local_server import LocalTritonServer, free_local_ports

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton]


# -- module fixtures: one repository, one server --------------------------------------------


@pytest.fixture(scope="module")
def tiny_repository(tiny_model_repository: Path) -> Path:
    return tiny_model_repository  # built once per session by conftest.py


triton = module_triton  # a tritonserver of this module's own


@pytest.fixture(scope="module")
def studies(fixtures_dir: Path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zips")
    return {
        "chest": zip_directory(fixtures_dir / "chest_ct_lung_dx_a0002", folder / "chest.zip"),
        "head": zip_directory(fixtures_dir / "head_ct_gantry_tilt", folder / "head.zip"),
    }


@pytest.fixture
def settings(
    tmp_path: Path, tiny_repository: Path, triton: LocalTritonServer
) -> Iterator[Settings]:
    settings = load_settings(environ={})
    settings.storage.root = tmp_path / "storage"
    settings.rabbitmq.queue_prefix = f"test-adapter-{uuid.uuid4().hex[:10]}"
    settings.rabbitmq.max_deliveries = 2
    # Short heartbeats: a study that outlives two of them proves the I/O loop kept going.
    settings.rabbitmq.heartbeat_s = 2
    settings.inference.backend = "triton"
    settings.inference.model_repository = tiny_repository
    settings.inference.triton_url = triton.grpc_url
    settings.inference.triton_timeout_s = 30
    settings.inference.model_server_backoff = Backoff(initial_s=1.0, maximum_s=2.0)
    yield settings
    delete_topology(settings.rabbitmq, [reply_queue_name(settings)])


def reply_queue_name(settings: Settings) -> str:
    return f"{settings.rabbitmq.queue_prefix}.replies.test-client"


def upload(settings: Settings, study: Path) -> tuple[str, str]:
    """Put a study where adapters read it; returns (task id, path relative to storage)."""
    task_id = uuid.uuid4().hex
    relative = f"uploads/{task_id}/{study.name}"
    target = settings.storage.root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(study.read_bytes())
    return task_id, relative


class Client:
    """A foreign system: plain pika, names and JSON as the README documents them."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.rabbitmq.queue_prefix
        self.reply_queue = reply_queue_name(settings)
        # The test's own connection keeps the default heartbeat: it idles while tests wait.
        broker = settings.rabbitmq.model_copy(update={"heartbeat_s": 60})
        self.connection = connect(broker, name="test client", give_up_after_s=10)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.queue_declare(self.reply_queue, durable=True)
        self.messages: list[StudyResult | StudyProgress] = []

    def submit(self, body: dict | bytes, *, message_type: str = "StudyTask") -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.channel.basic_publish(
            exchange=f"{self.prefix}.tasks",
            routing_key="study",
            body=payload,
            properties=pika.BasicProperties(
                content_type="application/json",
                type=message_type,
                delivery_mode=2,
                reply_to=self.reply_queue,
                correlation_id=body.get("task_id") if isinstance(body, dict) else None,
            ),
            mandatory=True,
        )

    def poll(self) -> None:
        """Take every reply waiting in the queue."""
        while True:
            method, properties, body = self.channel.basic_get(self.reply_queue, auto_ack=True)
            if method is None:
                return
            message = decode_message(body, type_name=properties.type)
            assert properties.correlation_id == message.task_id
            self.messages.append(message)

    def result(self, task_id: str, timeout_s: float = 90.0) -> StudyResult:
        def arrived() -> StudyResult | None:
            self.poll()
            for message in self.messages:
                if isinstance(message, StudyResult) and message.task_id == task_id:
                    return message
            return None

        return wait_for(arrived, timeout_s, f"the result of task {task_id}", interval_s=0.1)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def wait_until_consuming(settings: Settings) -> None:
    """The adapter declares the topology; a client may publish once the queue has a consumer."""
    topology = QueueTopology.from_settings(settings.rabbitmq)

    broker = settings.rabbitmq.model_copy(update={"heartbeat_s": 60})

    def consumers() -> int:
        connection = connect(broker, name="test probe", give_up_after_s=10)
        try:
            channel = connection.channel()
            frame = channel.queue_declare(topology.presence_queue(MODEL_STAGE), passive=True)
            return frame.method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            if connection.is_open:
                connection.close()

    wait_for(consumers, 60, "an adapter consuming the task queue", interval_s=0.3)


class AdapterInThread:
    def __init__(self, settings: Settings, adapter_id: str = "test-adapter") -> None:
        self.adapter = Adapter(settings, adapter_id=adapter_id, drain_timeout_s=10)
        self.thread = threading.Thread(target=self.adapter.run, daemon=True)

    def __enter__(self) -> Adapter:
        self.thread.start()
        return self.adapter

    def __exit__(self, *_exc: object) -> None:
        self.adapter.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the adapter did not stop"


def task_body(task_id: str, study_path: str, original_filename: str, reply_to: str) -> dict:
    """The documented StudyTask, written out by hand as a foreign system would."""
    return {
        "schema_version": 1,
        "task_id": task_id,
        "correlation_id": task_id,
        "study_path": study_path,
        "original_filename": original_filename,
        "submitted_at": "2026-01-01T12:00:00Z",
        "reply_to": reply_to,
        "submitted_by": "test-suite",
    }


# -- the tests -------------------------------------------------------------------------------


def test_study_through_adapter_equals_embedded_batch(
    settings: Settings, studies: dict[str, Path], tiny_repository: Path, tmp_path: Path
) -> None:
    """The adapter as a process (`python -m services.adapter`), configured by CTS__ variables."""
    environment = {
        **os.environ,
        "CTS__STORAGE__ROOT": str(settings.storage.root),
        "CTS__RABBITMQ__QUEUE_PREFIX": settings.rabbitmq.queue_prefix,
        "CTS__INFERENCE__MODEL_REPOSITORY": str(tiny_repository),
        "CTS__INFERENCE__TRITON_URL": settings.inference.triton_url,
    }
    health_file = tmp_path / "adapter.alive"
    adapter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.adapter",
            "--adapter-id",
            "proc-1",
            "--health-file",
            str(health_file),
        ],
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    client = Client(settings)
    try:
        wait_until_consuming(settings)
        task_id, relative = upload(settings, studies["chest"])
        client.submit(task_body(task_id, relative, "chest.zip", client.reply_queue))
        result = client.result(task_id)
    finally:
        client.close()
        adapter.terminate()
        output, _ = adapter.communicate(timeout=60)
    assert adapter.returncode == 0, output.decode(errors="replace")[-3000:]
    assert health_file.exists()

    assert result.status is TaskStatus.COMPLETED, result.error
    assert result.adapter_id == "proc-1"
    assert result.attempt == 1
    progress = [m for m in client.messages if isinstance(m, StudyProgress)]
    assert [m.stage for m in progress][:1] == ["started"]
    assert "inference" in {m.stage for m in progress}
    # Stored: the same document as the message.
    assert load_result(settings.storage.root, task_id) == result
    kinds = {item.kind for item in result.files}
    assert {"xlsx", "warnings", "json", "preview", "viewer"} <= kinds
    viewer = [item.path for item in result.files if item.kind == "viewer"]
    assert sorted(path.rsplit("/", 1)[-1] for path in viewer) == ["study1.bin", "study1.json"]
    for item in result.files:
        assert (settings.storage.root / item.path).is_file(), item.path

    # The embedded batch on the same study, with ONNX Runtime in-process.
    embedded_settings = load_settings(environ={})
    embedded_settings.inference.model_repository = tiny_repository
    backend = OnnxRuntimeBackend(tiny_repository, embedded_settings.inference)
    expected = process_input(
        studies["chest"], backend=backend, settings=embedded_settings, display_name="chest.zip"
    )
    assert len(result.reports) == len(expected) == 1
    got, want = result.reports[0], expected[0]
    assert got.processing_status is ProcessingStatus.SUCCESS, got.failure_reason
    assert want.processing_status is ProcessingStatus.SUCCESS
    assert (got.path_to_study, got.study_uid, got.series_uid) == (
        want.path_to_study,
        want.study_uid,
        want.series_uid,
    )
    assert got.probability_of_pathology == pytest.approx(want.probability_of_pathology, abs=1e-5)
    assert got.pathology == want.pathology
    assert [f.label for f in got.findings] == [f.label for f in want.findings]
    np.testing.assert_allclose(
        [f.probability for f in got.findings], [f.probability for f in want.findings], atol=1e-5
    )
    assert got.most_dangerous_pathology_type == want.most_dangerous_pathology_type
    assert got.model.backend == "triton"
    assert want.model.backend == "onnxruntime"
    assert got.demo_weights is True
    # The chest check asked Triton's body_part_regression (demo: shown, never decides).
    regression = got.chest_check.body_part_regression
    assert regression is not None
    assert regression.demo
    assert not got.chest_check.body_part_regression_decides
    np.testing.assert_allclose(
        regression.transformed_scores,
        want.chest_check.body_part_regression.transformed_scores,
        atol=1e-3,  # 1e-5 in raw scores; the demo table scales them by 100
    )
    # Information in the chest check, never a data-quality warning.
    assert not [w for w in got.warnings if w.startswith("body-part regression")]


def test_non_chest_study_malformed_message_and_missing_file(
    settings: Settings, studies: dict[str, Path]
) -> None:
    client = Client(settings)
    topology = QueueTopology.from_settings(settings.rabbitmq)
    try:
        with AdapterInThread(settings):
            wait_until_consuming(settings)
            # 1. Not JSON at all, 2. valid JSON of an unknown schema version.
            client.submit(b"\x00 definitely not a task")
            client.submit(
                {
                    **task_body("bad-version", "uploads/x.zip", "x.zip", client.reply_queue),
                    "schema_version": 99,
                }
            )
            head_id, head_path = upload(settings, studies["head"])
            client.submit(task_body(head_id, head_path, "head.zip", client.reply_queue))
            missing_id = uuid.uuid4().hex
            client.submit(
                task_body(
                    missing_id, f"uploads/{missing_id}/gone.zip", "gone.zip", client.reply_queue
                )
            )
            head = client.result(head_id)
            missing = client.result(missing_id)
    finally:
        client.close()

    # A head CT is a completed task whose study is a Failure row with the reason.
    assert head.status is TaskStatus.COMPLETED
    assert head.reports[0].processing_status is ProcessingStatus.FAILURE
    assert "not a chest CT" in head.reports[0].failure_reason
    assert {item.kind for item in head.files} >= {"xlsx", "warnings"}
    # A task whose study is missing is retried max_deliveries times, then fails with a
    # Failure row and goes to the dead letters.
    assert missing.status is TaskStatus.FAILED
    assert "not in the shared storage" in missing.error
    assert missing.attempt == settings.rabbitmq.max_deliveries
    assert missing.reports[0].path_to_study == "gone.zip"
    assert missing.reports[0].processing_status is ProcessingStatus.FAILURE

    connection = connect(settings.rabbitmq, name="test check", give_up_after_s=10)
    try:
        channel = connection.channel()
        assert channel.queue_declare(topology.task_queue, passive=True).method.message_count == 0
        dead = []
        reasons = []
        while (got := channel.basic_get(topology.dead_letter_queue, auto_ack=True))[0] is not None:
            dead.append(got[2])
            reasons.append((got[1].headers or {}).get(REASON_HEADER, ""))
    finally:
        connection.close()
    # Exactly the two malformed messages and the task without its study were dead-lettered,
    # unchanged, each with the reason it is there.
    assert len(dead) == 3
    assert dead[0] == b"\x00 definitely not a task"
    assert json.loads(dead[1])["schema_version"] == 99
    assert json.loads(dead[2])["task_id"] == missing_id
    assert reasons[0].startswith("the task message could not be read")
    assert reasons[1].startswith("the task message could not be read")
    assert "not in the shared storage" in reasons[2]
    assert reasons[2] == missing.error
    # The submitter heard of the unreadable messages too (it gave a reply_to).
    unreadable = [
        m
        for m in client.messages
        if isinstance(m, StudyResult) and m.status is TaskStatus.FAILED and m.task_id != missing_id
    ]
    assert len(unreadable) == 2
    assert {m.task_id for m in unreadable} >= {"bad-version"}
    assert all("could not be read" in (m.error or "") for m in unreadable)


def test_stored_result_is_republished_not_recomputed(
    settings: Settings, studies: dict[str, Path]
) -> None:
    task_id, relative = upload(settings, studies["chest"])
    task = StudyTask(task_id=task_id, study_path=relative, original_filename="chest.zip")
    # As if an adapter stored this result and died before acking.
    earlier = StudyResult(
        task_id=task_id,
        correlation_id=task_id,
        status=TaskStatus.COMPLETED,
        adapter_id="earlier-adapter",
    )
    store_result(settings.storage.root, earlier)
    client = Client(settings)
    try:
        with AdapterInThread(settings) as adapter:
            wait_until_consuming(settings)
            client.submit(task_body(task_id, relative, task.original_filename, client.reply_queue))
            result = client.result(task_id)
            wait_for(lambda: adapter.processed == 1, 10, "the ack")
    finally:
        client.close()
    assert result == earlier
    # Nothing recomputed: no report file, only the mark that the result was delivered.
    files = settings.storage.root / "results" / task_id
    assert [path.name for path in files.iterdir()] == [DELIVERED_MARK]


def test_an_idle_adapter_takes_work_when_its_doorbell_rings_not_at_its_next_poll(
    settings: Settings, studies: dict[str, Path]
) -> None:
    """Lanes polled once a minute: the chest's result comes well within that, because
    publish_task rings the preparation stage's doorbell and the hand-on the model stage's
    (services/broker/connection.py: ring_doorbell, Doorbell)."""
    settings.rabbitmq.poll_interval_s = 60.0
    task_id, relative = upload(settings, studies["chest"])
    client = Client(settings)
    try:
        with AdapterInThread(settings):
            wait_until_consuming(settings)
            time.sleep(1.0)  # both stages have asked their lanes and wait for the next poll
            task = StudyTask(
                task_id=task_id,
                study_path=relative,
                original_filename="chest.zip",
                reply_to=client.reply_queue,
            )
            publish_task(client.channel, QueueTopology.from_settings(settings.rabbitmq), task)
            result = client.result(task_id, timeout_s=40.0)
    finally:
        client.close()
    assert result.status is TaskStatus.COMPLETED
    assert result.reports[0].processing_status is ProcessingStatus.SUCCESS


def test_task_that_killed_its_workers_is_failed_and_dead_lettered(
    settings: Settings, studies: dict[str, Path]
) -> None:
    topology = QueueTopology.from_settings(settings.rabbitmq)
    task_id, relative = upload(settings, studies["chest"])
    client = Client(settings)
    broker = settings.rabbitmq.model_copy(update={"heartbeat_s": 60})
    connection = connect(broker, name="crashing worker", give_up_after_s=10)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_topology(channel, topology)
        publish_task(
            channel,
            topology,
            StudyTask(
                task_id=task_id,
                study_path=relative,
                original_filename="chest.zip",
                reply_to=client.reply_queue,
            ),
        )
        # Workers that took the task and died, max_deliveries times.
        for _ in range(settings.rabbitmq.max_deliveries):
            method = wait_for(lambda: channel.basic_get(topology.task_queue)[0], 10, "the task")
            channel.basic_nack(method.delivery_tag, requeue=True)
        with AdapterInThread(settings):
            result = client.result(task_id)
        dead = wait_for(
            lambda: channel.basic_get(topology.dead_letter_queue, auto_ack=True)[2],
            10,
            "the dead letter",
        )
    finally:
        client.close()
        connection.close()
    assert result.status is TaskStatus.FAILED
    assert result.attempt == settings.rabbitmq.max_deliveries + 1
    assert "given up after 2 attempts" in result.error
    assert result.reports[0].processing_status is ProcessingStatus.FAILURE
    assert decode_message(dead, StudyTask).task_id == task_id
    assert result_json_path(settings.storage.root, task_id).is_file()


def test_unavailable_triton_is_waited_for_not_failed(
    settings: Settings, studies: dict[str, Path], tiny_repository: Path, tmp_path: Path
) -> None:
    """Triton goes away after the adapter started: the study waits (heartbeats continue,
    nothing is redelivered) and completes when a server is back on the same port."""
    # A server of this test's own, so the module's server stays up for the other tests.
    ports = free_local_ports(3)
    settings.inference.triton_url = f"127.0.0.1:{ports[1]}"
    server = triton_server(tiny_repository, tmp_path / "t.log", ports)
    server.start()
    client = Client(settings)
    try:
        with AdapterInThread(settings):
            wait_until_consuming(settings)
            server.stop()
            task_id, relative = upload(settings, studies["chest"])
            client.submit(task_body(task_id, relative, "chest.zip", client.reply_queue))

            def retrying() -> bool:
                client.poll()
                return any(
                    isinstance(m, StudyProgress) and m.stage == "retrying" for m in client.messages
                )

            wait_for(retrying, 60, "the adapter to report it is waiting for Triton")
            time.sleep(5)  # > two heartbeat intervals with the worker blocked on Triton
            server = triton_server(tiny_repository, tmp_path / "t2.log", ports)
            server.start()
            result = client.result(task_id, timeout_s=120)
    finally:
        client.close()
        server.stop()
    assert result.status is TaskStatus.COMPLETED
    assert result.reports[0].processing_status is ProcessingStatus.SUCCESS
    assert result.attempt == 1  # never redelivered: the connection survived the wait


def registered_regions(url: str) -> list[str]:
    """The shared-memory regions the server at ``url`` has registered, asked by a new client."""
    client = grpcclient.InferenceServerClient(url)
    try:
        return list(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    finally:
        client.close()


def own_shm_files() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"cts_{os.getpid()}_")]


def test_triton_backend_transports_agree_and_clean_up(
    settings: Settings, tiny_repository: Path
) -> None:
    shape = (2, 1, *OnnxRuntimeBackend(tiny_repository, settings.inference).metadata.target_shape)
    volume = np.random.default_rng(7).uniform(-1, 1, shape).astype(np.float32)
    other = np.random.default_rng(8).uniform(-1, 1, shape).astype(np.float32)
    outputs, second = {}, {}
    for transport in ("grpc", "shared_memory"):
        inference = settings.inference.model_copy(update={"triton_transport": transport})
        backend = TritonBackend(inference)
        assert backend.transport == transport
        outputs[transport] = backend.infer(volume)
        second[transport] = backend.infer(other)  # a reused region holds the new input
        stats = backend.stats.as_dict()
        if transport == "grpc":
            assert stats["grpc_request_bytes"] == 2 * volume.nbytes
            assert stats["shared_memory_bytes"] == 0
            assert stats["regions_registered"] == 0
        else:
            assert stats["shared_memory_bytes"] == 2 * volume.nbytes
            assert stats["grpc_request_bytes"] == 0
            # One region, registered once, reused for the second request.
            assert stats["regions_registered"] == 1
            assert len(registered_regions(inference.triton_url)) == 1
            assert len(own_shm_files()) == 1
        backend.close()
        # Nothing stays registered on the server, nothing stays in /dev/shm.
        assert registered_regions(inference.triton_url) == []
    assert own_shm_files() == []
    for results in (outputs, second):
        np.testing.assert_allclose(
            results["grpc"].finding_probabilities,
            results["shared_memory"].finding_probabilities,
            atol=1e-6,
        )
    assert not np.allclose(
        outputs["grpc"].embedding, second["grpc"].embedding
    )  # the inputs differ, so must the outputs
    local = OnnxRuntimeBackend(tiny_repository, settings.inference)
    np.testing.assert_allclose(
        local.infer(volume).pathology_probability,
        outputs["grpc"].pathology_probability,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        local.infer(other).pathology_probability,
        second["shared_memory"].pathology_probability,
        atol=1e-5,
    )
    assert outputs["grpc"].embedding.shape == (2, backend.metadata.embedding_dim)


def test_triton_backend_registers_its_region_again_after_a_server_restart(
    settings: Settings, tiny_repository: Path, tmp_path: Path
) -> None:
    """A restarted server has forgotten the adapter's reused region: the next request
    registers it again instead of failing."""
    ports = free_local_ports(3)
    inference = settings.inference.model_copy(
        update={"triton_url": f"127.0.0.1:{ports[1]}", "triton_transport": "shared_memory"}
    )

    def server(log: str) -> LocalTritonServer:
        return triton_server(tiny_repository, tmp_path / log, ports)

    shape = (1, 1, *OnnxRuntimeBackend(tiny_repository, settings.inference).metadata.target_shape)
    volume = np.random.default_rng(3).uniform(-1, 1, shape).astype(np.float32)
    first_server = server("first.log")
    first_server.start()
    try:
        backend = TritonBackend(inference)
        before = backend.infer(volume)
    finally:
        first_server.stop()
    with server("second.log"):
        assert registered_regions(inference.triton_url) == []  # the new server knows none
        backend.wait_until_ready(60)
        after = backend.infer(volume)
        assert backend.stats.regions_registered == 2
        assert len(registered_regions(inference.triton_url)) == 1
        backend.close()
        assert registered_regions(inference.triton_url) == []
    np.testing.assert_allclose(after.embedding, before.embedding, atol=1e-6)
    assert own_shm_files() == []


def test_triton_backend_reports_an_unreachable_server_as_transient(settings: Settings) -> None:
    from services.core.errors import ModelServerUnavailable

    (port,) = free_local_ports(1)
    inference = settings.inference.model_copy(update={"triton_url": f"127.0.0.1:{port}"})
    with pytest.raises(ModelServerUnavailable, match="not ready"):
        TritonBackend(inference, ready_timeout_s=1)


# -- pure logic ------------------------------------------------------------------------------


def close_connections_named(name: str) -> int:
    """Make the broker drop the connections a client named ``name`` (and no other)."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'{{"connection_name","{name}"}}' in line
    ]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "test: dropped on purpose"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return len(pids)


def test_adapter_reconnects_after_the_broker_drops_it(
    settings: Settings, studies: dict[str, Path]
) -> None:
    adapter_id = f"reconnect-{uuid.uuid4().hex[:8]}"
    client = Client(settings)
    try:
        with AdapterInThread(settings, adapter_id=adapter_id):
            wait_until_consuming(settings)
            # Each stage has its own connection; both are dropped and both come back.
            for stage in STAGES:
                assert close_connections_named(f"adapter {adapter_id} {stage}") == 1
            task_id, relative = upload(settings, studies["chest"])
            client.submit(task_body(task_id, relative, "chest.zip", client.reply_queue))
            result = client.result(task_id)
    finally:
        client.close()
    assert result.status is TaskStatus.COMPLETED
    assert result.adapter_id == adapter_id

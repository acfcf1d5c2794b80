"""Messages and queue topology on the real RabbitMQ broker (127.0.0.1:5672, guest/guest).

Every test uses its own queue prefix and deletes what it declared.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pika
import pika.exceptions
import pytest
from stack_support import wait_for

from services.adapter.dead_letters import (
    ADAPTER_HEADER,
    DELIVERY_HEADER,
    REASON_HEADER,
    publish_dead_letter,
)
from services.broker.connection import (
    PublishError,
    connect,
    declare_reply_queue,
    declare_topology,
    delivery_count,
    publish_model_task,
    publish_reply,
    publish_task,
    queued_task_count,
    submit_task,
)
from services.broker.consumer import ReplyListener
from services.broker.schemas import (
    BROKER_SCHEMA_VERSION,
    MODEL_STAGE,
    PREPARE_STAGE,
    ModelTask,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    decode_message,
)
from services.core.config import Backoff, RabbitMQSettings
from services.core.schemas import ProcessingStatus, StudyReport

pytestmark = pytest.mark.rabbitmq


# -- pure message logic -------------------------------------------------------------------


# -- the real broker ----------------------------------------------------------------------


@pytest.fixture
def settings() -> Iterator[RabbitMQSettings]:
    prefix = f"test-broker-{uuid.uuid4().hex[:10]}"
    broker = RabbitMQSettings(queue_prefix=prefix, max_deliveries=2, heartbeat_s=30)
    yield broker
    delete_everything(broker, reply_ids=["frontend-a", "frontend-b"])


def delete_everything(settings: RabbitMQSettings, reply_ids: list[str]) -> None:
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="test cleanup", give_up_after_s=10)
    try:
        channel = connection.channel()
        queues = [*topology.waiting_lanes(), *topology.model_lanes(), topology.dead_letter_queue]
        queues += [topology.reply_queue(reply_id) for reply_id in reply_ids]
        for queue in queues:
            channel.queue_delete(queue)
        for exchange in (topology.task_exchange, topology.dead_letter_exchange):
            channel.exchange_delete(exchange)
    finally:
        connection.close()


@pytest.fixture
def channel(settings: RabbitMQSettings):
    connection = connect(settings, name="test", give_up_after_s=10)
    channel = connection.channel()
    channel.confirm_delivery()
    declare_topology(channel, QueueTopology.from_settings(settings))
    yield channel
    if connection.is_open:
        connection.close()


def get_one(channel, queue: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue)
        if method is not None:
            return method, properties, body
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue} within {timeout_s} s")


def test_task_is_persistent_confirmed_and_carries_its_properties(settings, channel) -> None:
    topology = QueueTopology.from_settings(settings)
    task = StudyTask(
        study_path="uploads/t/study.zip",
        original_filename="study.zip",
        reply_to=topology.reply_queue("frontend-a"),
    )
    publish_task(channel, topology, task)  # returns only after the broker's confirm
    method, properties, body = get_one(channel, topology.task_queue)
    channel.basic_ack(method.delivery_tag)
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert properties.type == "StudyTask"
    assert properties.content_type == "application/json"
    assert properties.correlation_id == task.task_id
    assert properties.reply_to == task.reply_to
    assert properties.message_id == task.task_id
    assert properties.headers["schema_version"] == BROKER_SCHEMA_VERSION
    assert decode_message(body, StudyTask, type_name=properties.type) == task
    assert delivery_count(properties) == 0


def test_task_queue_is_a_durable_quorum_queue(settings, channel) -> None:
    topology = QueueTopology.from_settings(settings)
    frame = channel.queue_declare(topology.task_queue, passive=True)
    assert frame.method.queue == topology.task_queue
    # Declaring it as anything else is refused by the broker: the arguments are what we say.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        channel.queue_declare(
            topology.task_queue, durable=True, arguments={"x-queue-type": "classic"}
        )
    assert refused.value.reply_code == 406


def test_message_returned_too_often_goes_to_the_dead_letter_queue(settings, channel) -> None:
    topology = QueueTopology.from_settings(settings)
    task = StudyTask(study_path="uploads/t/crash.zip", original_filename="crash.zip")
    publish_task(channel, topology, task)
    counts = []
    for _ in range(settings.max_deliveries + 1):
        method, properties, _body = get_one(channel, topology.task_queue)
        counts.append(delivery_count(properties))
        channel.basic_nack(method.delivery_tag, requeue=True)  # as if the worker died
    assert counts == list(range(settings.max_deliveries + 1))
    method, properties, body = get_one(channel, topology.dead_letter_queue)
    channel.basic_ack(method.delivery_tag)
    assert decode_message(body, StudyTask) == task
    assert properties.headers["x-first-death-reason"] == "delivery_limit"
    assert channel.queue_declare(topology.task_queue, passive=True).method.message_count == 0


def test_rejected_message_goes_to_the_dead_letter_queue(settings, channel) -> None:
    """The adapter's fallback when its own dead letter is refused: the broker's, reason-less."""
    topology = QueueTopology.from_settings(settings)
    channel.basic_publish(topology.task_exchange, "study", b"{not a task")
    method, _properties, _body = get_one(channel, topology.task_queue)
    channel.basic_reject(method.delivery_tag, requeue=False)
    _method, properties, body = get_one(channel, topology.dead_letter_queue)
    assert body == b"{not a task"
    assert properties.headers["x-first-death-reason"] == "rejected"


def test_an_adapters_dead_letter_says_why_it_is_there(settings, channel) -> None:
    """The adapter copies the message to the dead-letter exchange with its reason, confirmed,
    and only then acks the original: nothing lost, and a human reads why."""
    topology = QueueTopology.from_settings(settings)
    task = StudyTask(study_path="uploads/t/gone.zip", original_filename="gone.zip")
    publish_task(channel, topology, task)
    method, properties, body = get_one(channel, topology.task_queue)
    publish_dead_letter(
        channel,
        topology,
        body=body,
        properties=properties,
        reason="the study is not in the shared storage (tried 2 times)",
        adapter_id="adapter-7",
        attempt=2,
    )
    channel.basic_ack(method.delivery_tag)
    dead_method, dead_properties, dead_body = get_one(channel, topology.dead_letter_queue)
    channel.basic_ack(dead_method.delivery_tag)
    assert dead_body == body  # the task itself, unchanged
    assert decode_message(dead_body, StudyTask, type_name=dead_properties.type) == task
    headers = dead_properties.headers
    assert headers[REASON_HEADER] == "the study is not in the shared storage (tried 2 times)"
    assert headers[ADAPTER_HEADER] == "adapter-7"
    assert headers[DELIVERY_HEADER] == 2
    assert dead_properties.message_id == task.task_id
    assert dead_properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert channel.queue_declare(topology.task_queue, passive=True).method.message_count == 0


def make_result(task_id: str) -> StudyResult:
    return StudyResult(
        task_id=task_id,
        correlation_id=task_id,
        status=TaskStatus.COMPLETED,
        reports=[
            StudyReport(
                path_to_study="study.zip",
                study_uid="1.2.3",
                series_uid="1.2.3.4",
                probability_of_pathology=0.25,
                pathology=0,
                processing_status=ProcessingStatus.SUCCESS,
                time_of_processing=1.5,
            )
        ],
    )


def test_replies_reach_only_the_frontend_that_asked(settings, channel) -> None:
    topology = QueueTopology.from_settings(settings)
    queue_a = declare_reply_queue(channel, topology, "frontend-a")
    queue_b = declare_reply_queue(channel, topology, "frontend-b")
    result = make_result("task-for-a")
    publish_reply(channel, result, reply_to=queue_a, correlation_id="task-for-a")
    method, properties, body = get_one(channel, queue_a)
    channel.basic_ack(method.delivery_tag)
    assert properties.correlation_id == "task-for-a"
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert decode_message(body, type_name=properties.type) == result
    assert channel.queue_declare(queue_b, passive=True).method.message_count == 0


def test_reply_to_a_missing_queue_is_reported(settings, channel) -> None:
    with pytest.raises(PublishError, match="no queue"):
        publish_reply(
            channel,
            make_result("t"),
            reply_to=f"{settings.queue_prefix}.replies.nobody",
            correlation_id="t",
        )


def test_reply_listener_hands_results_and_progress_to_the_handler(settings, channel) -> None:
    received: list[StudyResult | StudyProgress] = []
    arrived = threading.Event()

    def handler(message: StudyResult | StudyProgress) -> None:
        received.append(message)
        if isinstance(message, StudyResult):
            arrived.set()

    listener = ReplyListener(settings, "frontend-b", handler)
    listener.start()
    try:
        assert listener.ready.wait(15)
        progress = StudyProgress(task_id="t-b", stage="inference", fraction=0.5)
        publish_reply(
            channel, progress, reply_to=listener.queue_name, correlation_id="t-b", persistent=False
        )
        publish_reply(
            channel, make_result("t-b"), reply_to=listener.queue_name, correlation_id="t-b"
        )
        assert arrived.wait(15)
    finally:
        listener.stop()
    assert not listener.is_alive()
    assert [type(message).__name__ for message in received] == ["StudyProgress", "StudyResult"]
    assert received[1].reports[0].probability_of_pathology == 0.25
    # Acked: nothing is left for the next start of this frontend.
    assert channel.queue_declare(listener.queue_name, passive=True).method.message_count == 0


def test_submit_task_and_queue_depth(settings) -> None:
    assert queued_task_count(settings) == 0
    for index in range(3):
        submit_task(settings, StudyTask(study_path=f"uploads/{index}.zip", original_filename="x"))
    assert queued_task_count(settings) == 3


def test_queued_work_rings_its_stage_s_doorbell_and_a_ring_never_waits(settings, channel) -> None:
    """ring_doorbell (services/broker/connection.py): a new task rings the preparation
    stage's doorbell and a prepared one the model stage's, to the adapters listening (a
    stage listens while it has room); with none listening, the ring expires at once."""
    topology = QueueTopology.from_settings(settings)
    doorbells = {stage: topology.doorbell_queue(stage) for stage in (PREPARE_STAGE, MODEL_STAGE)}
    task = StudyTask(study_path="uploads/t/study.zip", original_filename="study.zip")
    try:
        publish_task(channel, topology, task)  # no adapter listens
        for queue in doorbells.values():
            assert channel.queue_declare(queue, passive=True).method.message_count == 0
        adapter = connect(settings, name="test adapter", give_up_after_s=10)
        try:
            listening = adapter.channel()
            rings: list[tuple[str, bytes]] = []
            for stage, queue in doorbells.items():
                listening.basic_consume(
                    queue,
                    lambda _ch, _method, _p, body, stage=stage: rings.append((stage, body)),
                    auto_ack=True,
                )
            publish_task(channel, topology, task)
            handoff = ModelTask(task=task, prepared_path="prepared/t", prepare_attempt=1)
            publish_model_task(channel, topology, handoff)
            deadline = time.monotonic() + 10
            while len(rings) < 2 and time.monotonic() < deadline:
                adapter.process_data_events(time_limit=0.2)
        finally:
            adapter.close()
        assert rings == [(PREPARE_STAGE, b""), (MODEL_STAGE, b"")]
        for queue in doorbells.values():
            assert channel.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        for stage in (PREPARE_STAGE, MODEL_STAGE):
            channel.queue_delete(topology.doorbell_queue(stage))
            channel.queue_delete(topology.presence_queue(stage))


def test_wrong_credentials_fail_fast() -> None:
    wrong = RabbitMQSettings(username="nobody", password="wrong")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect(wrong, name="test wrong credentials", give_up_after_s=30)


def broker_connections(connection_name: str) -> list[str]:
    """The broker's names of the connections a client opened under ``connection_name``
    (RabbitMQ's management API, which start.sh and ensure_services.sh enable)."""
    answer = httpx.get("http://127.0.0.1:15672/api/connections", auth=("guest", "guest"))
    answer.raise_for_status()
    return [
        item["name"]
        for item in answer.json()
        if item.get("client_properties", {}).get("connection_name") == connection_name
    ]


def test_a_consumer_waits_out_each_outage_with_a_fresh_backoff(settings, channel) -> None:
    """Three outages, well after the consumer started: each is waited out from the first
    wait again, so a give-up limit counts from the outage, not from the start."""
    settings.reconnect_backoff = Backoff(initial_s=0.2, maximum_s=1.0, give_up_after_s=3.0)
    received: list[str] = []
    listener = ReplyListener(
        settings, "frontend-r", lambda message: received.append(message.task_id)
    )
    listener.start()
    try:
        assert listener.ready.wait(15)
        time.sleep(4.0)  # longer than the give-up limit, counted from the start
        for outage in range(3):
            (name,) = wait_for(lambda: broker_connections(listener.name) or None, 15, "the link")
            closed = httpx.delete(
                f"http://127.0.0.1:15672/api/connections/{quote(name, safe='')}",
                auth=("guest", "guest"),
            )
            assert closed.status_code == 204
            wait_for(
                lambda name=name: (broker_connections(listener.name) or [name]) != [name] or None,
                15,
                "a new connection",
            )
            publish_reply(
                channel,
                make_result(f"t-{outage}"),
                reply_to=listener.queue_name,
                correlation_id=f"t-{outage}",
            )
            wait_for(lambda outage=outage: f"t-{outage}" in received or None, 15, "the reply")
        assert listener.is_alive()
    finally:
        listener.stop()
    assert received == ["t-0", "t-1", "t-2"]

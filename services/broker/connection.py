"""RabbitMQ plumbing shared by adapters, frontends and scripts (pika, blocking adapter).

pika connections are not thread-safe: each thread owns its connection. Everything that
publishes uses publisher confirms and persistent messages, so ``publish_*`` returning
means the broker has the message on disk.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from tenacity import stop_when_event_set

from services.broker.errors import PublishError
from services.broker.schemas import (
    CONTENT_TYPE,
    MODEL_STAGE,
    PREPARE_STAGE,
    PRIORITY_ORDER,
    STAGES,
    ModelTask,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    _Message,
    encode_message,
    task_routing_key,
)
from services.core.config import RabbitMQSettings
from services.core.retry import log_retry, retrying

PERSISTENT = pika.DeliveryMode.Persistent
TRANSIENT = pika.DeliveryMode.Transient

# What a lost or refused connection looks like; callers reconnect on these.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)


def connection_parameters(
    settings: RabbitMQSettings, *, name: str, heartbeat_s: int | None = None
) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=settings.host,
        port=settings.port,
        virtual_host=settings.virtual_host,
        credentials=pika.PlainCredentials(settings.username, settings.current_password()),
        heartbeat=settings.heartbeat_s if heartbeat_s is None else heartbeat_s,
        blocked_connection_timeout=300,
        connection_attempts=1,
        socket_timeout=10,
        client_properties={"connection_name": name},
    )


def connect(
    settings: RabbitMQSettings,
    *,
    name: str,
    stop: threading.Event | None = None,
    give_up_after_s: float | None = None,
) -> BlockingConnection:
    """Connect, retrying with exponential backoff until ``stop`` is set or time runs out.

    Wrong credentials are not retried (they do not fix themselves). A stop requested while
    waiting raises WorkInterrupted; otherwise the last connection error is raised.
    """

    def retriable(error: BaseException) -> bool:
        return isinstance(error, CONNECTION_ERRORS) and not isinstance(
            error, pika.exceptions.ProbableAuthenticationError
        )

    return retrying(
        retry_on=retriable,
        backoff=settings.reconnect_backoff,
        give_up_after_s=give_up_after_s,
        stop_event=stop,
        stop=stop_when_event_set(stop) if stop is not None else None,
        before_sleep=log_retry(f"connecting to RabbitMQ at {settings.host}:{settings.port}"),
    )(BlockingConnection, connection_parameters(settings, name=name))


def declare_topology(channel: BlockingChannel, topology: QueueTopology) -> None:
    """Exchanges and queues of the task path; idempotent (same names, same arguments)."""
    channel.exchange_declare(topology.dead_letter_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(topology.dead_letter_queue, durable=True)
    channel.queue_bind(topology.dead_letter_queue, topology.dead_letter_exchange)
    channel.exchange_declare(topology.task_exchange, exchange_type="direct", durable=True)
    for priority in PRIORITY_ORDER:
        lane = topology.task_lane(priority)
        channel.queue_declare(lane, durable=True, arguments=topology.task_queue_arguments())
        channel.queue_bind(lane, topology.task_exchange, routing_key=task_routing_key(priority))
        # Checked tasks wait for their preparation, prepared studies for the model here
        # (published by the preparation stage through the default exchange); same
        # guarantees as the task lanes.
        for later_lane in (topology.preparation_lane(priority), topology.model_lane(priority)):
            channel.queue_declare(
                later_lane, durable=True, arguments=topology.task_queue_arguments()
            )
    for stage in STAGES:
        channel.queue_declare(topology.presence_queue(stage), durable=True)
        channel.queue_declare(topology.doorbell_queue(stage), durable=True)
    channel.queue_declare(
        topology.registry_queue, durable=True, arguments=topology.registry_queue_arguments()
    )


def declare_reply_queue(channel: BlockingChannel, topology: QueueTopology, frontend_id: str) -> str:
    """A durable reply queue for one frontend: results wait there while the frontend restarts."""
    name = topology.reply_queue(frontend_id)
    channel.queue_declare(name, durable=True, arguments=topology.reply_queue_arguments())
    return name


def message_properties(
    message: _Message,
    *,
    correlation_id: str | None,
    reply_to: str | None = None,
    persistent: bool = True,
    message_id: str | None = None,
) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        type=type(message).__name__,
        delivery_mode=PERSISTENT if persistent else TRANSIENT,
        correlation_id=correlation_id,
        reply_to=reply_to,
        message_id=message_id,
        timestamp=int(time.time()),
        headers={"schema_version": message.schema_version},
    )


def _publish(
    channel: BlockingChannel,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: pika.BasicProperties,
    mandatory: bool,
) -> None:
    # On a channel in confirm mode basic_publish waits for the broker's ack.
    try:
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=properties,
            mandatory=mandatory,
        )
    except pika.exceptions.UnroutableError as error:
        raise PublishError(f"no queue takes messages for {routing_key!r}") from error
    except pika.exceptions.NackError as error:
        raise PublishError(f"the broker refused the message for {routing_key!r}") from error


def publish_task(channel: BlockingChannel, topology: QueueTopology, task: StudyTask) -> None:
    """Queue a task in its priority's lane (channel must be in confirm mode)."""
    _publish_for_task(
        channel, topology.task_exchange, task_routing_key(task.priority), message=task, task=task
    )
    ring_doorbell(channel, topology, PREPARE_STAGE)


# Expires on reaching the queue unless a consumer can take it at once (RabbitMQ's TTL 0).
DOORBELL = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Transient, expiration="0")


def ring_doorbell(channel: BlockingChannel, topology: QueueTopology, stage: str) -> None:
    """Wake an idle adapter of ``stage`` now rather than at its next poll of the lanes
    (services/adapter/stage_loop.py; up to rabbitmq.poll_interval_s, 0.25 s, at each of a
    study's stages): an empty message to the stage's doorbell queue, which an adapter's
    stage consumes only while it has room for a study. With none free the message is
    dropped (TTL 0), and the lanes are polled as before. Best effort."""
    with contextlib.suppress(*CONNECTION_ERRORS, pika.exceptions.AMQPError):
        channel.basic_publish(
            exchange="", routing_key=topology.doorbell_queue(stage), body=b"", properties=DOORBELL
        )


class Doorbell:
    """A stage's doorbell, rung by ring_doorbell: consumed while the stage has room for a
    study, so that a ring ends its wait for the next poll at once; cancelled while it is
    full, so that rings reach the adapters that can answer them."""

    def __init__(self, channel: BlockingChannel, queue: str) -> None:
        self._channel = channel
        self._queue = queue
        self._consumer: str | None = None

    def listen(self, *, has_room: bool) -> None:
        if has_room and self._consumer is None:
            # A ring carries nothing: that it came makes process_data_events return.
            self._consumer = self._channel.basic_consume(
                self._queue, lambda _channel, _method, _properties, _body: None, auto_ack=True
            )
        elif not has_room and self._consumer is not None:
            self._channel.basic_cancel(self._consumer)
            self._consumer = None


def publish_for_preparation(
    channel: BlockingChannel, topology: QueueTopology, task: StudyTask
) -> None:
    """Put a task in its priority's preparation lane (confirmed): checked first, or back
    from the model stage because its model input is gone."""
    _publish_for_task(
        channel, "", topology.preparation_lane(task.priority), message=task, task=task
    )
    ring_doorbell(channel, topology, PREPARE_STAGE)


def publish_model_task(
    channel: BlockingChannel, topology: QueueTopology, handoff: ModelTask
) -> None:
    """Hand a prepared task to the model stage (its lane by priority; confirmed)."""
    # Like publish_for_preparation, an adapter's hand-on between stage lanes: the lanes are
    # queues addressed by name on the default exchange ("").
    lane = topology.model_lane(handoff.task.priority)
    _publish_for_task(channel, "", lane, message=handoff, task=handoff.task)
    ring_doorbell(channel, topology, MODEL_STAGE)


def _publish_for_task(
    channel: BlockingChannel,
    exchange: str,
    routing_key: str,
    message: StudyTask | ModelTask,
    task: StudyTask,
) -> None:
    """A message of one task's work (the task, or its hand-on to the model stage): its
    replies go where the task's go, its message id is the task's (confirmed, mandatory)."""
    _publish(
        channel,
        exchange=exchange,
        routing_key=routing_key,
        body=encode_message(message),
        properties=message_properties(
            message,
            correlation_id=task.reply_correlation_id,
            reply_to=task.reply_to,
            message_id=task.task_id,
        ),
        mandatory=True,
    )


def publish_reply(
    channel: BlockingChannel,
    message: StudyResult | StudyProgress,
    *,
    reply_to: str,
    correlation_id: str | None,
    persistent: bool = True,
) -> None:
    """Send a result (persistent, confirmed) or progress (transient) to a reply queue."""
    _publish(
        channel,
        exchange="",
        routing_key=reply_to,
        body=encode_message(message),
        properties=message_properties(
            message, correlation_id=correlation_id, persistent=persistent
        ),
        mandatory=True,
    )


def publish_to_registry(
    channel: BlockingChannel,
    topology: QueueTopology,
    message: StudyResult | StudyProgress,
    *,
    persistent: bool = True,
) -> None:
    """What the study registry records (services/registry/recorder.py): a result
    (persistent, confirmed) or progress (transient)."""
    _publish(
        channel,
        exchange="",
        routing_key=topology.registry_queue,
        body=encode_message(message),
        properties=message_properties(
            message, correlation_id=message.task_id, persistent=persistent
        ),
        mandatory=True,
    )


def delivery_count(properties: pika.BasicProperties) -> int:
    """How many times the broker has handed this message out before (quorum queue header)."""
    headers = properties.headers or {}
    try:
        return int(headers.get("x-delivery-count", 0))
    except (TypeError, ValueError):
        return 0


def submit_task(settings: RabbitMQSettings, task: StudyTask, *, name: str = "cts-submit") -> None:
    """One confirmed publish on a short-lived connection (uploads are rare; an idle blocking
    connection would miss its heartbeats)."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name=name, give_up_after_s=10)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_topology(channel, topology)
        publish_task(channel, topology, task)
    finally:
        close_quietly(connection)


def queued_task_count(settings: RabbitMQSettings) -> int:
    """Tasks waiting to be prepared, every lane (not counting the ones adapters hold)."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="cts-queue-depth", give_up_after_s=10)
    try:
        channel = connection.channel()
        declare_topology(channel, topology)
        return sum(
            int(channel.queue_declare(lane, passive=True).method.message_count)
            for lane in topology.waiting_lanes()
        )
    finally:
        close_quietly(connection)


def close_quietly(connection: BlockingConnection) -> None:
    """Close a connection that may be lost already: the broker being away is not an error."""
    try:
        if connection.is_open:
            connection.close()
    except CONNECTION_ERRORS:
        pass

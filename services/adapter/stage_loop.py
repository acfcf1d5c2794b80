"""One stage of the adapter on its own RabbitMQ connection: take messages from the stage's
lanes, most urgent first, work each on a worker thread and execute the delivery rules'
decision (services/adapter/delivery.py): store the result once, publish it (or hand the
prepared task to the model stage), then ack, give back or dead-letter the message.

Lanes: RabbitMQ 3.10's quorum queues have no message priorities (4.0 brought them) and a
consumer subscribed to several queues is fed from whichever queue delivers first. So the
stage does not subscribe to its lanes: whenever it has room (``prefetch_count``) it asks
them with ``basic.get`` in order, STAT, urgent, routine, and takes the first message found;
idle, it asks again every ``rabbitmq.poll_interval_s``, or at once when whoever queued work
rings the stage's doorbell (consumed only while the stage has room). A message is never
taken before the stage can work it, so nothing waits prefetched (and a quorum queue counts every message
given back as a delivery). Each stage also consumes its presence queue, which never holds a
message: the broker's consumer count there is the adapters alive, and a killed adapter's
consumer disappears with its connection.

Threads: this loop owns the pika connection (heartbeats keep flowing while a study takes
minutes); each message is worked on a worker thread, which hands its decision back with
``connection.add_callback_threadsafe``. When the connection drops while studies are in
progress, their workers finish and store first; the stage takes messages again only when
they are done, so it never holds more studies than ``prefetch_count``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pika
import pika.exceptions
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from services.adapter import delivery
from services.adapter.delivery import Action, Decision
from services.adapter.execute import Delivery, execute_decision, send_progress
from services.broker.connection import (
    CONNECTION_ERRORS,
    Doorbell,
    connect,
    declare_topology,
    delivery_count,
)
from services.broker.schemas import (
    MODEL_STAGE,
    WAITING_FOR_PREPARATION,
    MessageError,
    ModelTask,
    StudyProgress,
    StudyResult,
    StudyTask,
    decode_message,
)
from services.broker.storage import load_result, was_delivered
from services.core.errors import WorkInterrupted

# How often a stage counts the adapters alive in it (the adapter holds model inputs in
# memory only while its model stage is the only one, services/adapter/held_inputs.py).
PRESENCE_COUNT_INTERVAL_S = 1.0

Work = Callable[
    [Any, int, Callable[[str, float, str], None], bool], "StudyResult | ModelTask | StudyTask"
]


@dataclass(frozen=True)
class StageSpec:
    """What a stage takes and does: its lanes (most urgent first), its message type, the
    work (message, attempt, progress, check first -> result or hand-off) and what follows
    a stored result (the model stage removes the prepared files).

    ``check_first_lanes``: lanes whose message is only checked first while more wait behind
    it (in the same lane, or in the lane named, where checked tasks of its priority wait).
    ``checked_first_at``: once this many wait in a checked lane, it is asked before its task
    lane (results keep coming under a flood of new tasks). ``earlier_attempts`` (lane, task
    id): deliveries a task had before it came to this lane, so that the delivery limit
    counts them all (a checked task's check)."""

    name: str
    lanes: list[str]
    message_type: type[StudyTask] | type[ModelTask]
    work: Work
    after_result: Callable[[str], None] = lambda task_id: None
    check_first_lanes: dict[str, str] = field(default_factory=dict)
    checked_first_at: int = 1
    earlier_attempts: Callable[[str, str], int] = lambda lane, task_id: 0


def task_of(message: StudyTask | ModelTask) -> StudyTask:
    return message.task if isinstance(message, ModelTask) else message


class StageLoop:
    """One stage's connection, its lanes and its worker threads; ``owner`` is the Adapter
    (settings, storage, topology, metrics, stop flag, health file, result storing)."""

    def __init__(self, owner: Any, spec: StageSpec) -> None:
        self.owner = owner
        self.spec = spec
        self._in_flight: set[int] = set()  # delivery tags being worked (I/O thread only)
        self._workers: set[threading.Thread] = set()
        self._connection: BlockingConnection | None = None  # while consuming

    def wake(self) -> None:
        """From any thread: end the I/O loop's wait now (the adapter is stopping)."""
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(*CONNECTION_ERRORS, pika.exceptions.AMQPError):
            connection.add_callback_threadsafe(lambda: None)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the adapter stops; a lost connection is reconnected with backoff."""
        try:
            self.owner.serve_reconnecting(self._serve)
        except WorkInterrupted:
            pass  # stopped while waiting to reconnect
        except CONNECTION_ERRORS:
            pass  # stopped after a failed attempt

    def _serve(self) -> None:
        if self._wait_for_workers():
            self._consume()

    def _wait_for_workers(self) -> bool:
        """Let the studies of a lost connection finish (and store their results) before
        taking new ones; False if the adapter is stopping meanwhile."""
        self._workers = {worker for worker in self._workers if worker.is_alive()}
        while self._workers:
            for worker in list(self._workers):
                worker.join(1.0)
                if not worker.is_alive():
                    self._workers.discard(worker)
            self.owner.health.touch()
            if self.owner.stopping:
                return False
        return True

    # -- the I/O loop ------------------------------------------------------------------------

    def _consume(self) -> None:
        owner = self.owner
        settings = owner.settings.rabbitmq
        connection = connect(
            settings, name=f"adapter {owner.adapter_id} {self.spec.name}", stop=owner.stop_event
        )
        self._in_flight.clear()
        self._connection = connection
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, owner.topology)
            channel.basic_qos(prefetch_count=1)
            # Presence only: the queue never holds a message (any that came is dropped).
            presence_queue = owner.topology.presence_queue(self.spec.name)
            presence = channel.basic_consume(
                presence_queue, lambda ch, method, _p, _b: ch.basic_ack(method.delivery_tag)
            )
            logger.info(
                "adapter {} {} stage taking {} (most urgent first, {} at once)",
                owner.adapter_id,
                self.spec.name,
                ", ".join(self.spec.lanes),
                settings.prefetch_count,
            )
            doorbell = Doorbell(channel, owner.topology.doorbell_queue(self.spec.name))
            counted = -PRESENCE_COUNT_INTERVAL_S
            while not owner.stopping:
                if self.spec.name == MODEL_STAGE and time.monotonic() - counted >= (
                    PRESENCE_COUNT_INTERVAL_S
                ):
                    counted = time.monotonic()
                    alive = channel.queue_declare(presence_queue, passive=True)
                    owner.note_model_stages_alive(int(alive.method.consumer_count))
                while len(self._in_flight) < settings.prefetch_count and not owner.stopping:
                    if not self._take_next(connection, channel):
                        break
                doorbell.listen(has_room=len(self._in_flight) < settings.prefetch_count)
                connection.process_data_events(time_limit=settings.poll_interval_s)
                owner.health.touch()
            if channel.is_open:
                doorbell.listen(has_room=False)
                channel.basic_cancel(presence)
            if self.spec.name == MODEL_STAGE:
                # Before its deliveries go back: the next adapter finds their inputs.
                owner.held_inputs.release_all()
            self._drain(connection)
        finally:
            self._connection = None
            if self.spec.name == MODEL_STAGE:
                owner.note_model_stages_alive(0)  # unknown until it is back
            try:
                if connection.is_open:
                    connection.close()  # unacked deliveries go back to their lanes
            except CONNECTION_ERRORS:
                pass

    def _take_next(self, connection: BlockingConnection, channel: BlockingChannel) -> bool:
        """The first message of the most urgent lane that has one; False if all are empty."""
        for lane in self._lanes_in_turn(channel):
            method, properties, body = channel.basic_get(lane)
            if method is not None:
                check_first = self._others_wait(channel, lane, method)
                self._on_message(
                    connection, channel, method, properties, body, lane, check_first=check_first
                )
                return True
        return False

    def _lanes_in_turn(self, channel: BlockingChannel) -> list[str]:
        """The lanes in the order to ask them now: the spec's, but a priority's checked
        tasks before its new ones once ``checked_first_at`` of them wait."""
        lanes = list(self.spec.lanes)
        for task_lane, checked_lane in self.spec.check_first_lanes.items():
            waiting = channel.queue_declare(checked_lane, passive=True).method.message_count
            if int(waiting) >= self.spec.checked_first_at:
                first, second = lanes.index(task_lane), lanes.index(checked_lane)
                lanes[first], lanes[second] = lanes[second], lanes[first]
        return lanes

    def _others_wait(self, channel: BlockingChannel, lane: str, method: Any) -> bool:
        """Whether a task taken from ``lane`` is only checked first: more tasks of its
        priority wait, new ones behind it or checked ones before it (first in, first out)."""
        checked_lane = self.spec.check_first_lanes.get(lane)
        if checked_lane is None:
            return False
        if int(method.message_count) > 0:  # what basic.get left in the lane
            return True
        waiting = channel.queue_declare(checked_lane, passive=True).method.message_count
        return int(waiting) > 0

    def _drain(self, connection: BlockingConnection) -> None:
        """On stop: take nothing more; let the work in progress finish (up to the drain
        timeout), else it goes back to its lane with the connection."""
        deadline = time.monotonic() + self.owner.drain_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        if self._in_flight:
            logger.warning(
                "{} stage stopping with {} task(s) unfinished: given back",
                self.spec.name,
                len(self._in_flight),
            )

    def _on_message(
        self,
        connection: BlockingConnection,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
        lane: str,
        *,
        check_first: bool = False,
    ) -> None:
        owner = self.owner
        message = Delivery(method.delivery_tag, properties, body)
        expected = self.spec.message_type
        try:
            decoded = decode_message(body, expected, type_name=properties.type or expected.__name__)
        except MessageError as error:
            # The reason is logged, not the body: it may hold anything.
            logger.error("dead-lettering a malformed message ({} bytes): {}", len(body), error)
            decision = delivery.on_malformed(
                body,
                error,
                correlation_id=properties.correlation_id,
                message_id=properties.message_id,
                adapter_id=owner.adapter_id,
            )
            self._execute(channel, decision, message, reply_to=properties.reply_to)
            return
        task = task_of(decoded)
        earlier = self.spec.earlier_attempts(lane, task.task_id)
        message = replace(message, attempt=delivery_count(properties) + 1 + earlier)
        early = delivery.on_delivery(
            task,
            attempt=message.attempt,
            max_deliveries=owner.topology.max_deliveries,
            stored=load_result(owner.storage_root, task.task_id),
            adapter_id=owner.adapter_id,
            delivered=was_delivered(owner.storage_root, task.task_id, task.reply_to),
        )
        if early is not None:
            logger.info("task {}: {}", task.task_id, early.note)
            decision = self._store(early, task.task_id)
            republished = early.action is Action.ACK
            self._execute(
                channel,
                decision,
                message,
                reply_to=task.reply_to,
                task=task,
                republished=republished,
            )
            return
        logger.info(
            "task {} received by the {} stage (attempt {}, {})",
            task.task_id,
            self.spec.name,
            message.attempt,
            task.priority.value,
        )
        self._in_flight.add(message.tag)
        self._send_progress(channel, task, "started", 0.0, f"adapter {owner.adapter_id}")
        worker = threading.Thread(
            target=self._work,
            args=(connection, channel, decoded, message, check_first),
            name=f"{self.spec.name}-{task.task_id[:8]}",
            daemon=True,
        )
        self._workers.add(worker)
        worker.start()

    def _store(self, decision: Decision, task_id: str) -> Decision:
        stored = self.owner.store(decision)
        if stored.result is not None and decision.store:
            self.spec.after_result(task_id)
        return stored

    # -- the worker thread -------------------------------------------------------------------

    def _work(
        self,
        connection: BlockingConnection,
        channel: BlockingChannel,
        decoded: StudyTask | ModelTask,
        message: Delivery,
        check_first: bool,
    ) -> None:
        owner = self.owner
        task = task_of(decoded)

        def send(stage: str, fraction: float, text: str) -> None:
            callback = functools.partial(self._send_progress, channel, task, stage, fraction, text)
            self._call_on_io_thread(connection, callback)

        outcome: StudyResult | ModelTask | StudyTask | BaseException
        owner.metrics.in_progress.inc()
        try:
            outcome = self.spec.work(decoded, message.attempt, send, check_first)
        except Exception as error:  # noqa: BLE001 - the delivery rules decide what it means
            if not isinstance(error, WorkInterrupted):
                logger.opt(exception=error).warning("task {} ended with an error", task.task_id)
            outcome = error
        finally:
            owner.metrics.in_progress.dec()
        if isinstance(outcome, StudyResult):
            owner.metrics.result_computed(outcome)
        elif isinstance(outcome, StudyTask):
            why = "its model input is gone" if isinstance(decoded, ModelTask) else "checked"
            send(WAITING_FOR_PREPARATION, 0.0, f"{why}; waiting for its preparation")
        decision = delivery.on_outcome(
            task,
            outcome,
            attempt=message.attempt,
            max_deliveries=owner.topology.max_deliveries,
            adapter_id=owner.adapter_id,
        )
        # Stored before it is published and acked: if this process dies in between, the
        # redelivered task finds the result and republishes it.
        decision = self._store(decision, task.task_id)
        if decision.delay_s:
            owner.stop_event.wait(decision.delay_s)  # a stop gives it back at once
        logger.info(
            "task {} ({} stage): {} ({})",
            task.task_id,
            self.spec.name,
            decision.action.value,
            decision.note,
        )
        if decision.stop_adapter:
            logger.error("stopping the adapter: {}", decision.note)
            owner.request_stop()
        self._call_on_io_thread(
            connection,
            functools.partial(
                self._execute, channel, decision, message, reply_to=task.reply_to, task=task
            ),
        )

    def _call_on_io_thread(
        self, connection: BlockingConnection, callback: Callable[[], None]
    ) -> None:
        try:
            connection.add_callback_threadsafe(callback)
        except (pika.exceptions.ConnectionWrongStateError, *CONNECTION_ERRORS) as error:
            # The connection is gone: the broker redelivers the message; a stored result
            # (or a recorded preparation) is sent on from storage then.
            logger.warning("connection closed before the outcome could be sent: {}", error)

    # -- back on the I/O thread --------------------------------------------------------------

    def _execute(
        self,
        channel: BlockingChannel,
        decision: Decision,
        message: Delivery,
        *,
        reply_to: str | None,
        task: StudyTask | None = None,
        republished: bool = False,
    ) -> None:
        owner = self.owner
        self._in_flight.discard(message.tag)
        executed = channel.is_open  # else the broker gives the message to another delivery
        finished = execute_decision(
            channel,
            decision,
            message,
            topology=owner.topology,
            adapter_id=owner.adapter_id,
            reply_to=reply_to,
            correlation_id=task.reply_correlation_id if task else None,
            storage_root=owner.storage_root,
        )
        if executed and decision.handoff is None:
            owner.metrics.task_finished(decision, republished=republished)
        if finished and task is not None and decision.handoff is None:
            owner.count_processed()

    def _send_progress(
        self, channel: BlockingChannel, task: StudyTask, stage: str, fraction: float, text: str
    ) -> None:
        send_progress(
            channel,
            self.owner.topology,
            task,
            StudyProgress(
                task_id=task.task_id,
                correlation_id=task.reply_correlation_id,
                stage=stage,
                fraction=fraction,
                message=text,
                adapter_id=self.owner.adapter_id,
                priority=task.priority,
            ),
        )

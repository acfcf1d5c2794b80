"""A queue consumed on a thread of its own, each message handed to a function that says what
becomes of it: acked, or given back for later (the registry's database is down, say).

A message is acked only after its handler returned ``Disposition.ACK``, so a consumer that
dies leaves it in the queue. ``Disposition.LATER`` gives the message back and pauses the
consumer for the next wait of its backoff (doubling while the handler keeps saying LATER),
so a database outage is waited out without spinning through redeliveries. A lost broker
connection is reconnected with ``rabbitmq.reconnect_backoff``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import pika
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.connection import (
    CONNECTION_ERRORS,
    close_quietly,
    connect,
    declare_reply_queue,
)
from services.broker.errors import MessageError
from services.broker.schemas import QueueTopology, StudyProgress, StudyResult, decode_message
from services.core.config import Backoff, RabbitMQSettings
from services.core.errors import WorkInterrupted
from services.core.retry import log_retry, retrying_until_stopped

PROCESS_EVENTS_S = 0.5  # how often the consumer looks at its stop flag and pause


class Disposition(str, Enum):
    ACK = "ack"  # done with: the message leaves the queue
    LATER = "later"  # not now: the message goes back, the consumer pauses


Report = StudyResult | StudyProgress
ReportHandler = Callable[[Report], Disposition]
QueueDeclaration = Callable[[BlockingChannel], str]  # declares the queue, returns its name


class QueueConsumer(threading.Thread):
    """Consumes the queue ``declare`` names and hands each report to ``handler``."""

    def __init__(
        self,
        settings: RabbitMQSettings,
        declare: QueueDeclaration,
        handler: ReportHandler,
        *,
        pause: Backoff,
        name: str,
        prefetch: int = 50,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._settings = settings
        self._declare = declare
        self._handler = handler
        self._pause = pause
        self._prefetch = prefetch
        self._stop_event = threading.Event()
        self.ready = threading.Event()  # set once the queue exists and is consumed
        self.queue_name: str | None = None
        self._consumer_tag: str | None = None
        self._resume_at: float | None = None
        self._pauses = 0

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout_s)

    def run(self) -> None:
        """Consume until stopped. Each outage is waited out with a fresh backoff: a consumer
        that ran for days starts again from the first wait (and a give-up limit counts from
        the outage, not from the start)."""
        backoff = self._settings.reconnect_backoff
        while not self._stop_event.is_set():
            try:
                retrying_until_stopped(
                    self._stop_event,
                    retry_on=CONNECTION_ERRORS,
                    backoff=backoff,
                    before_sleep=log_retry(f"the {self.name} RabbitMQ connection"),
                )(self._consume)
            except WorkInterrupted:
                return  # stopped while waiting to reconnect
            except CONNECTION_ERRORS:
                return  # stopped, or gave up after the backoff's limit
            self._stop_event.wait(backoff.initial_s)  # a lost connection: once, then again

    def _consume(self) -> None:
        """Returns when a connection that was consuming is lost (or on stop); raises when it
        could not be made, which the backoff waits out."""
        connection = connect(self._settings, name=self.name, stop=self._stop_event)
        established = False
        try:
            channel = connection.channel()
            self.queue_name = self._declare(channel)
            channel.basic_qos(prefetch_count=self._prefetch)
            self._start_consuming(channel)
            self.ready.set()
            established = True
            while not self._stop_event.is_set():
                connection.process_data_events(time_limit=PROCESS_EVENTS_S)
                if self._resume_at is not None and time.monotonic() >= self._resume_at:
                    self._start_consuming(channel)
        except CONNECTION_ERRORS as error:
            if not established:
                raise
            logger.warning(
                "the {} RabbitMQ connection was lost ({}): reconnecting",
                self.name,
                type(error).__name__,
            )
        finally:
            self._consumer_tag = None
            close_quietly(connection)

    def _start_consuming(self, channel: BlockingChannel) -> None:
        assert self.queue_name is not None
        self._resume_at = None
        self._consumer_tag = channel.basic_consume(self.queue_name, self._on_message)

    def _pause_consuming(self, channel: BlockingChannel) -> None:
        """Take no more messages for the next wait of the backoff (what is prefetched comes
        back unhandled: given back at once)."""
        if self._consumer_tag is not None:
            channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        wait = min(self._pause.initial_s * 2**self._pauses, self._pause.maximum_s)
        self._pauses += 1
        self._resume_at = time.monotonic() + wait
        logger.warning("{}: paused for {:.1f} s", self.name, wait)

    def _on_message(
        self,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        if self._consumer_tag is None:  # prefetched before a pause
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        try:
            message = decode_message(body, type_name=properties.type)
        except MessageError as error:
            logger.error("{}: dropping an unreadable message: {}", self.name, error)
            channel.basic_ack(method.delivery_tag)
            return
        if not isinstance(message, StudyResult | StudyProgress):
            logger.error("{}: dropping a {}", self.name, type(message).__name__)
            channel.basic_ack(method.delivery_tag)
            return
        try:
            disposition = self._handler(message)
        except Exception:  # noqa: BLE001 - the handler's bug must not kill the consumer
            logger.exception("{}: handler failed for task {}", self.name, message.task_id)
            disposition = Disposition.ACK
        if disposition is Disposition.ACK:
            self._pauses = 0
            channel.basic_ack(method.delivery_tag)
        else:
            channel.basic_nack(method.delivery_tag, requeue=True)
            self._pause_consuming(channel)


class ReplyListener(QueueConsumer):
    """A submitter's own reply queue (durable, expires when idle), every message acked after
    ``handler`` saw it."""

    def __init__(
        self,
        settings: RabbitMQSettings,
        frontend_id: str,
        handler: Callable[[Report], None],
        *,
        name: str = "reply-listener",
    ) -> None:
        topology = QueueTopology.from_settings(settings)

        def handle(report: Report) -> Disposition:
            handler(report)
            return Disposition.ACK

        super().__init__(
            settings,
            lambda channel: declare_reply_queue(channel, topology, frontend_id),
            handle,
            pause=settings.reconnect_backoff,
            name=name,
        )
        self.queue_name = topology.reply_queue(frontend_id)

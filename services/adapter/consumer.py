"""The adapter's RabbitMQ consumer: takes StudyTasks, screens each on a worker thread and
executes the delivery rules' decision (services/adapter/delivery.py): store the result once,
publish it, then ack, give back or dead-letter the message.

Threads: the main thread owns the pika connection and runs its I/O loop (heartbeats keep
flowing while a study takes minutes); each delivery is processed on a worker thread, which
hands its decision back with ``connection.add_callback_threadsafe``. pika objects are only
touched on the I/O thread.

A result is stored before it is published and acked, and stored once (the first stored
result of a task is the one every later delivery republishes). When the broker connection
drops while studies are in progress, their workers finish and store first; the adapter
consumes again only when they are done, so it never holds more studies than
``prefetch_count`` (memory is budgeted per study).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from tenacity import RetryCallState, stop_when_event_set

from services.adapter import delivery
from services.adapter.delivery import Action, Decision
from services.adapter.execute import Delivery, execute_decision, send_progress
from services.adapter.housekeeping import HealthFile, sweep_leftovers_forever
from services.adapter.metrics import WAIT_BROKER, AdapterMetrics, MeteredBackend, adapter_metrics
from services.adapter.model_server_wait import RetryingBackend
from services.adapter.predecessors import EarlierReports
from services.adapter.progress import InferenceTimes, ProgressRelay
from services.adapter.task_runner import run_task
from services.broker.connection import (
    CONNECTION_ERRORS,
    connect,
    declare_topology,
    delivery_count,
)
from services.broker.schemas import (
    MessageError,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    decode_message,
)
from services.broker.storage import load_result, store_result_once
from services.core.config import Settings
from services.core.errors import ModelServerUnavailable, WorkInterrupted
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend
from services.core.retry import log_retry, retrying


def default_adapter_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Adapter:
    def __init__(
        self,
        settings: Settings,
        *,
        adapter_id: str | None = None,
        health_file: Path | None = None,
        drain_timeout_s: float = 60.0,
        backend_factory: Callable[[Settings], InferenceBackend] = create_backend,
        metrics: AdapterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.adapter_id = adapter_id or default_adapter_id()
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.storage_root = settings.storage.root
        self.health = HealthFile(health_file)
        self.drain_timeout_s = drain_timeout_s
        self._backend_factory = backend_factory
        self._backend: InferenceBackend | None = None  # metered: every model request counted
        self._transfer_stats: Any = None  # TritonBackend: bytes moved, by transport
        self.metrics = metrics or adapter_metrics()
        self._stop = threading.Event()
        self._in_flight: set[int] = set()  # delivery tags being processed (I/O thread only)
        self._consumer_tag: str | None = None  # while this adapter takes tasks (I/O thread only)
        self._workers: set[threading.Thread] = set()  # study threads, of any connection
        self.processed = 0  # results published and acked or dead-lettered (tests and logs)
        self.inference_times = InferenceTimes()  # the model's recent durations: progress by time
        self.earlier_reports = EarlierReports(settings)  # what a study's new SR supersedes

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Thread- and signal-safe: stop taking tasks, finish (or give back) the current one."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        self.settings.storage.root.mkdir(parents=True, exist_ok=True)
        try:
            backend = self._wait_for_backend()
        except WorkInterrupted:
            return
        self._backend = MeteredBackend(backend, self.metrics)
        self._transfer_stats = getattr(backend, "stats", None)
        threading.Thread(
            target=sweep_leftovers_forever,
            args=(self._stop, self.settings.inference.triton_url),
            kwargs={"shared_memory": getattr(backend, "transport", None) == "shared_memory"},
            name="sweep",
            daemon=True,
        ).start()
        try:
            retrying(
                retry_on=CONNECTION_ERRORS,
                backoff=self.settings.rabbitmq.reconnect_backoff,
                stop_event=self._stop,
                stop=stop_when_event_set(self._stop),
                before_sleep=self._before_reconnect,
            )(self._serve)
        except WorkInterrupted:
            pass  # stopped while waiting to reconnect
        except CONNECTION_ERRORS:
            pass  # stopped after a failed attempt
        finally:
            backend.close()
            self.earlier_reports.close()
            logger.info("adapter {} stopped after {} results", self.adapter_id, self.processed)

    def _before_reconnect(self, state: RetryCallState) -> None:
        log_retry("the adapter's RabbitMQ connection")(state)
        self.metrics.waited(WAIT_BROKER, state.upcoming_sleep)

    def _wait_for_backend(self) -> InferenceBackend:
        """Triton may still be loading models: wait for it (with backoff) before consuming."""

        def create() -> InferenceBackend:
            self.health.touch()
            return self._backend_factory(self.settings)

        return retrying(
            retry_on=ModelServerUnavailable,
            backoff=self.settings.inference.model_server_backoff,
            stop_event=self._stop,
            before_sleep=log_retry("waiting for the model server"),
        )(create)

    def _serve(self) -> None:
        """Consume until stopped; a lost connection raises (and run() reconnects)."""
        if self._wait_for_workers():
            self._consume()

    def _wait_for_workers(self) -> bool:
        """Let the studies of a lost connection finish (and store their results) before
        taking new tasks; False if the adapter is stopping meanwhile."""
        self._workers = {worker for worker in self._workers if worker.is_alive()}
        if self._workers:
            logger.info(
                "waiting for {} study(ies) of the lost connection to finish", len(self._workers)
            )
        while self._workers:
            for worker in list(self._workers):
                worker.join(1.0)
                if not worker.is_alive():
                    self._workers.discard(worker)
            self.health.touch()
            if self._stop.is_set():
                return False
        return True

    # -- the I/O loop ----------------------------------------------------------------------

    def _consume(self) -> None:
        connection = connect(
            self.settings.rabbitmq, name=f"adapter {self.adapter_id}", stop=self._stop
        )
        self._in_flight.clear()
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, self.topology)
            channel.basic_qos(prefetch_count=self.settings.rabbitmq.prefetch_count)
            on_message = functools.partial(self._on_message, connection)
            self._consumer_tag = channel.basic_consume(self.topology.task_queue, on_message)
            logger.info(
                "adapter {} consuming {} (prefetch {})",
                self.adapter_id,
                self.topology.task_queue,
                self.settings.rabbitmq.prefetch_count,
            )
            while not self._stop.is_set():
                connection.process_data_events(time_limit=1.0)
                self.health.touch()
            self._drain(connection, channel)
        finally:
            try:
                if connection.is_open:
                    connection.close()  # unacked deliveries go back to the queue
            except CONNECTION_ERRORS:
                pass

    def _stop_consuming(self, channel: BlockingChannel) -> None:
        """Take no more tasks. Before a stopping adapter acks or gives back its study: else
        the freed prefetch slot brings the next task, which pika's cancel then gives back
        unread, and the broker counts that as one of the task's deliveries."""
        if self._consumer_tag is not None and channel.is_open:
            channel.basic_cancel(self._consumer_tag)
        self._consumer_tag = None

    def _drain(self, connection: BlockingConnection, channel: BlockingChannel) -> None:
        """On stop: take no new task; let the current one finish (up to drain_timeout_s)."""
        self._stop_consuming(channel)
        deadline = time.monotonic() + self.drain_timeout_s
        if self._in_flight:
            logger.info(
                "stopping: waiting up to {:.0f} s for the study in progress", self.drain_timeout_s
            )
        while self._in_flight and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        if self._in_flight:
            logger.warning(
                "stopping with {} task(s) unfinished: they go back to the queue",
                len(self._in_flight),
            )

    def _on_message(
        self,
        connection: BlockingConnection,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        message = Delivery(method.delivery_tag, properties, body)
        try:
            task: StudyTask = decode_message(
                body, StudyTask, type_name=properties.type or "StudyTask"
            )
        except MessageError as error:
            # The reason is logged, not the body: it may hold anything.
            logger.error("dead-lettering a malformed task message ({} bytes): {}", len(body), error)
            decision = delivery.on_malformed(
                body,
                error,
                correlation_id=properties.correlation_id,
                message_id=properties.message_id,
                adapter_id=self.adapter_id,
            )
            self._execute(channel, decision, message, reply_to=properties.reply_to)
            return
        message = replace(message, attempt=delivery_count(properties) + 1)
        early = delivery.on_delivery(
            task,
            attempt=message.attempt,
            max_deliveries=self.topology.max_deliveries,
            stored=load_result(self.storage_root, task.task_id),
            adapter_id=self.adapter_id,
        )
        if early is not None:
            logger.info("task {}: {}", task.task_id, early.note)
            decision = self._store(early)
            self._execute(
                channel,
                decision,
                message,
                reply_to=task.reply_to,
                task=task,
                republished=early.action is Action.ACK,
            )
            return
        logger.info("task {} received (attempt {})", task.task_id, message.attempt)
        self._in_flight.add(message.tag)
        self._send_progress(channel, task, "started", 0.0, f"adapter {self.adapter_id}")
        worker = threading.Thread(
            target=self._work,
            args=(connection, channel, task, message),
            name=f"study-{task.task_id[:8]}",
            daemon=True,
        )
        self._workers.add(worker)
        worker.start()

    def _store(self, decision: Decision) -> Decision:
        """Store the decision's result once (when it says so) and return the decision with
        the task's stored result: the first stored result of a task is its one result."""
        if not decision.store or decision.result is None:
            return decision
        assert self._backend is not None
        result = delivery.with_demo_flag(decision.result, self._backend.metadata.demo)
        return replace(decision, result=store_result_once(self.storage_root, result), store=False)

    # -- the worker thread -----------------------------------------------------------------

    def _work(
        self,
        connection: BlockingConnection,
        channel: BlockingChannel,
        task: StudyTask,
        message: Delivery,
    ) -> None:
        def send(stage: str, fraction: float, text: str) -> None:
            callback = functools.partial(self._send_progress, channel, task, stage, fraction, text)
            self._call_on_io_thread(connection, callback)

        progress = ProgressRelay(send)
        assert self._backend is not None
        backend = RetryingBackend(
            self._backend,
            self._stop,
            on_retry=progress.retrying,
            backoff=self.settings.inference.model_server_backoff,
            wait_limit_s=self.settings.inference.model_server_wait_limit_s,
            on_wait=self.metrics.model_server_retry,
        )
        outcome: StudyResult | BaseException
        self.metrics.in_progress.inc()
        try:
            outcome = run_task(
                task,
                backend=backend,
                settings=self.settings,
                adapter_id=self.adapter_id,
                attempt=message.attempt,
                progress=progress,
                inference_times=self.inference_times,
                earlier_reports=self.earlier_reports,
            )
        except Exception as error:  # noqa: BLE001 - the delivery rules decide what it means
            if not isinstance(error, WorkInterrupted):
                logger.opt(exception=error).warning("task {} ended with an error", task.task_id)
            outcome = error
        finally:
            self.metrics.in_progress.dec()
        if isinstance(outcome, StudyResult):
            self.metrics.result_computed(outcome)
        decision = delivery.on_outcome(
            task,
            outcome,
            attempt=message.attempt,
            max_deliveries=self.topology.max_deliveries,
            adapter_id=self.adapter_id,
        )
        # Stored before it is published and acked: if this process dies in between, the
        # redelivered task finds the result and republishes it. If another delivery of the
        # task stored first, that result is the one published (one result per task).
        decision = self._store(decision)
        if decision.delay_s:
            self._stop.wait(decision.delay_s)  # a stop gives it back at once
        transfer = self._transfer_stats
        logger.info(
            "task {}: {} ({}); model server transfers so far: {}",
            task.task_id,
            decision.action.value,
            decision.note,
            transfer.as_dict() if transfer is not None else "-",
        )
        if decision.stop_adapter:
            logger.error("stopping the adapter: {}", decision.note)
            self.request_stop()
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
            # The connection is gone: the broker redelivers the task, and a stored result
            # is republished from storage then.
            logger.warning("connection closed before the outcome could be sent: {}", error)

    # -- back on the I/O thread ------------------------------------------------------------

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
        self._in_flight.discard(message.tag)
        if self.stopping:
            self._stop_consuming(channel)
        executed = channel.is_open  # else the broker gives the message to another delivery
        finished = execute_decision(
            channel,
            decision,
            message,
            topology=self.topology,
            adapter_id=self.adapter_id,
            reply_to=reply_to,
            correlation_id=task.reply_correlation_id if task else None,
        )
        if executed:
            self.metrics.task_finished(decision, republished=republished)
        if finished and task is not None:
            self.processed += 1

    def _send_progress(
        self, channel: BlockingChannel, task: StudyTask, stage: str, fraction: float, message: str
    ) -> None:
        send_progress(
            channel,
            self.topology,
            task,
            StudyProgress(
                task_id=task.task_id,
                correlation_id=task.reply_correlation_id,
                stage=stage,
                fraction=fraction,
                message=message,
                adapter_id=self.adapter_id,
            ),
        )

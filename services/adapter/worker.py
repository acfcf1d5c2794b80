"""The adapter: consumes StudyTasks from RabbitMQ, screens each study on a worker thread,
stores and publishes the StudyResult, and only then acks.

Threads: the main thread owns the pika connection and runs its I/O loop (heartbeats keep
flowing while a study takes minutes); each delivery is processed on a worker thread, which
hands its outcome back with ``connection.add_callback_threadsafe``. pika objects are only
touched on the I/O thread.

Delivery rules (see services/broker/schemas.py for the topology):

* malformed message -> a FAILED result to its ``reply_to`` (when it has one; not stored,
  since its task id cannot be trusted), then rejected without requeue -> dead-letter queue;
* a stored result exists for the task (a redelivery after a crash between storing and
  acking) -> that result is republished, nothing is recomputed;
* delivery number > max_deliveries (the adapter died on every earlier attempt) -> a FAILED
  result, then rejected -> dead-letter queue;
* the study file is missing from the shared storage -> given back (after a short wait) up
  to max_deliveries attempts, then a FAILED result and the dead-letter queue;
* the model server is unavailable -> the worker waits and retries (RetryingBackend), up to
  inference.model_server_wait_limit_s, then the study is a Failure row;
* any other error of the study -> a FAILED result, acked (retrying would fail again).

A result is stored before it is published and acked, and stored once (the first stored
result of a task is the one every later delivery republishes). When the broker connection
drops while studies are in progress, their workers finish and store first; the adapter
consumes again only when they are done, so it never holds more studies than
``prefetch_count`` (memory is budgeted per study).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
from loguru import logger
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from services.adapter.leftovers import (
    SWEEP_INTERVAL_S,
    sweep_shared_memory,
    sweep_temp_dirs,
    temp_base,
)
from services.adapter.processing import (
    AdapterStopping,
    RetryingBackend,
    StudyNotFoundError,
    failed_result,
    run_task,
)
from services.broker.connection import (
    CONNECTION_ERRORS,
    PublishError,
    backoff_delays,
    connect,
    declare_topology,
    delivery_count,
    publish_reply,
)
from services.broker.schemas import (
    MessageError,
    QueueTopology,
    StudyProgress,
    StudyResult,
    StudyTask,
    TaskStatus,
    check_safe_id,
    decode_message,
    new_task_id,
)
from services.broker.storage import load_result, store_result_once
from services.core.config import Settings
from services.core.inference import create_backend
from services.core.inference.base import InferenceBackend, TransientBackendError
from services.core.schemas import ProcessingStatus, StudyReport

HEALTH_INTERVAL_S = 5.0
# A study missing from the shared storage is given back after this wait: a shared volume
# may show a new file late, and another adapter may mount it properly.
MISSING_STUDY_RETRY_DELAY_S = 2.0
UNREADABLE_TASK_NAME = "(unreadable task message)"


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
        retry_maximum_delay_s: float = 30.0,
        backend_factory: Callable[[Settings], InferenceBackend] = create_backend,
    ) -> None:
        self.settings = settings
        self.adapter_id = adapter_id or default_adapter_id()
        self.topology = QueueTopology.from_settings(settings.rabbitmq)
        self.storage_root = settings.storage.root
        self.health_file = health_file
        self.drain_timeout_s = drain_timeout_s
        self.retry_maximum_delay_s = retry_maximum_delay_s
        self._backend_factory = backend_factory
        self._backend: InferenceBackend | None = None
        self._stop = threading.Event()
        self._in_flight: set[int] = set()  # delivery tags being processed (I/O thread only)
        self._workers: set[threading.Thread] = set()  # study threads, of any connection
        self._last_health = 0.0
        self.processed = 0  # results published and acked (for tests and logs)

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Thread- and signal-safe: stop taking tasks, finish (or give back) the current one."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        self.settings.storage.root.mkdir(parents=True, exist_ok=True)
        backend = self._wait_for_backend()
        if backend is None:
            return
        self._backend = backend
        threading.Thread(target=self._sweep_leftovers, name="sweep", daemon=True).start()
        delays = backoff_delays()
        try:
            while not self._stop.is_set():
                try:
                    if not self._wait_for_workers():
                        break
                    self._consume()
                    delays = backoff_delays()
                except CONNECTION_ERRORS as error:
                    if self._stop.is_set():
                        break
                    delay = next(delays)
                    logger.warning("lost RabbitMQ ({!r}); reconnecting in {:.1f} s", error, delay)
                    self._stop.wait(delay)
        finally:
            backend.close()
            logger.info("adapter {} stopped after {} results", self.adapter_id, self.processed)

    def _wait_for_backend(self) -> InferenceBackend | None:
        """Triton may still be loading models: wait for it (with backoff) before consuming."""
        for delay in backoff_delays(1.0, 15.0):
            if self._stop.is_set():
                return None
            try:
                return self._backend_factory(self.settings)
            except TransientBackendError as error:
                logger.info("waiting for the model server: {}", error)
                self._touch_health()
                self._stop.wait(delay)
        return None

    def _sweep_leftovers(self) -> None:
        """Now and every minute: remove what adapters killed mid-study left behind (their
        unpacked studies, their shared memory; see services/adapter/leftovers.py)."""
        uses_shared_memory = getattr(self._backend, "transport", None) == "shared_memory"
        while True:
            try:
                sweep_temp_dirs(temp_base())
                if uses_shared_memory:
                    sweep_shared_memory(self.settings.inference.triton_url)
            except Exception:  # noqa: BLE001 - housekeeping must never stop the adapter
                logger.exception("sweeping the leftovers of dead adapters failed")
            if self._stop.wait(SWEEP_INTERVAL_S):
                return

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
            self._touch_health()
            if self._stop.is_set():
                return False
        return True

    def _touch_health(self) -> None:
        if self.health_file is None:
            return
        now = time.monotonic()
        if now - self._last_health >= HEALTH_INTERVAL_S:
            self.health_file.parent.mkdir(parents=True, exist_ok=True)
            self.health_file.touch()
            self._last_health = now

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
            consumer_tag = channel.basic_consume(self.topology.task_queue, on_message)
            logger.info(
                "adapter {} consuming {} (prefetch {})",
                self.adapter_id,
                self.topology.task_queue,
                self.settings.rabbitmq.prefetch_count,
            )
            while not self._stop.is_set():
                connection.process_data_events(time_limit=1.0)
                self._touch_health()
            self._drain(connection, channel, consumer_tag)
        finally:
            try:
                if connection.is_open:
                    connection.close()  # unacked deliveries go back to the queue
            except CONNECTION_ERRORS:
                pass

    def _drain(
        self, connection: BlockingConnection, channel: BlockingChannel, consumer_tag: str
    ) -> None:
        """On stop: take no new task; let the current one finish (up to drain_timeout_s)."""
        channel.basic_cancel(consumer_tag)
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
        tag = method.delivery_tag
        try:
            task: StudyTask = decode_message(
                body, StudyTask, type_name=properties.type or "StudyTask"
            )
        except MessageError as error:
            # The reason is logged, not the body: it may hold anything.
            logger.error("dead-lettering a malformed task message ({} bytes): {}", len(body), error)
            self._reply_unreadable(channel, properties, body, error)
            channel.basic_reject(tag, requeue=False)
            return
        attempt = delivery_count(properties) + 1
        stored = load_result(self.storage_root, task.task_id)
        if stored is not None:
            logger.info("task {} already has a stored result: republishing it", task.task_id)
            self._publish_and_ack(channel, task, stored, tag)
            return
        if attempt > self.topology.max_deliveries:
            reason = (
                f"given up after {self.topology.max_deliveries} attempts: the adapter stopped or "
                "crashed while processing this study every time"
            )
            logger.error("task {}: {}", task.task_id, reason)
            result = failed_result(task, reason, adapter_id=self.adapter_id, attempt=attempt)
            result = store_result_once(self.storage_root, result)
            self._publish_result(channel, task, result)
            channel.basic_reject(tag, requeue=False)  # to the dead-letter queue, for a human
            return
        logger.info("task {} received (attempt {})", task.task_id, attempt)
        self._in_flight.add(tag)
        self._send_progress(channel, task, "started", 0.0, f"adapter {self.adapter_id}")
        worker = threading.Thread(
            target=self._work,
            args=(connection, channel, task, attempt, tag),
            name=f"study-{task.task_id[:8]}",
            daemon=True,
        )
        self._workers.add(worker)
        worker.start()

    # -- the worker thread -----------------------------------------------------------------

    def _work(
        self,
        connection: BlockingConnection,
        channel: BlockingChannel,
        task: StudyTask,
        attempt: int,
        tag: int,
    ) -> None:
        def progress(stage: str, fraction: float, message: str) -> None:
            callback = functools.partial(
                self._send_progress, channel, task, stage, fraction, message
            )
            self._call_on_io_thread(connection, callback)

        assert self._backend is not None
        backend = RetryingBackend(
            self._backend,
            self._stop,
            on_retry=lambda message: progress("retrying", 0.5, message),
            maximum_delay_s=self.retry_maximum_delay_s,
            wait_limit_s=self.settings.inference.model_server_wait_limit_s,
        )
        try:
            result = run_task(
                task,
                backend=backend,
                settings=self.settings,
                adapter_id=self.adapter_id,
                attempt=attempt,
                progress=progress,
            )
        except AdapterStopping:
            logger.warning("task {} given back: the adapter is stopping", task.task_id)
            self._call_on_io_thread(connection, functools.partial(self._give_back, channel, tag))
            return
        except TransientBackendError as error:
            # The pipeline itself met an unavailable server outside infer(): give it back.
            logger.warning("task {} given back: {}", task.task_id, error)
            self._call_on_io_thread(connection, functools.partial(self._give_back, channel, tag))
            return
        except StudyNotFoundError as error:
            if attempt < self.topology.max_deliveries:
                # Not the error text: the path may carry a file name with a patient's name.
                logger.warning(
                    "task {} (attempt {}): study not in the shared storage; giving it back",
                    task.task_id,
                    attempt,
                )
                self._stop.wait(MISSING_STUDY_RETRY_DELAY_S)  # a stop gives it back at once
                self._call_on_io_thread(
                    connection, functools.partial(self._give_back, channel, tag)
                )
                return
            reason = f"{error} (tried {attempt} times)"
            logger.error("task {}: study not in the shared storage, given up", task.task_id)
            result = failed_result(task, reason, adapter_id=self.adapter_id, attempt=attempt)
            result = store_result_once(self.storage_root, result)
            self._call_on_io_thread(
                connection, functools.partial(self._publish_and_reject, channel, task, result, tag)
            )
            return
        except Exception as error:  # a bug outside the pipeline's own error handling
            logger.exception("task {} failed unexpectedly", task.task_id)
            result = failed_result(
                task,
                f"{type(error).__name__}: {error}",
                adapter_id=self.adapter_id,
                attempt=attempt,
            )
        # Stored before it is published and acked: if this process dies in between, the
        # redelivered task finds the result and republishes it. If another delivery of the
        # task stored first, that result is the one published (one result per task).
        result = store_result_once(self.storage_root, result)
        transfer = getattr(self._backend, "stats", None)  # TritonBackend: bytes by transport
        logger.info(
            "task {} finished: {} in {:.1f} s ({} report(s)); model server transfers so far: {}",
            task.task_id,
            result.status.value,
            result.seconds,
            len(result.reports),
            transfer.as_dict() if transfer is not None else "-",
        )
        self._call_on_io_thread(
            connection, functools.partial(self._publish_and_ack, channel, task, result, tag)
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

    def _publish_result(
        self, channel: BlockingChannel, task: StudyTask, result: StudyResult
    ) -> None:
        if not task.reply_to:
            return
        try:
            publish_reply(
                channel, result, reply_to=task.reply_to, correlation_id=task.reply_correlation_id
            )
        except PublishError as error:
            # The submitter's queue is gone; the result stays in storage for it.
            logger.warning("result of task {} not delivered: {}", task.task_id, error)

    def _publish_and_ack(
        self, channel: BlockingChannel, task: StudyTask, result: StudyResult, tag: int
    ) -> None:
        self._in_flight.discard(tag)
        if not channel.is_open:
            return
        self._publish_result(channel, task, result)
        channel.basic_ack(tag)
        self.processed += 1

    def _publish_and_reject(
        self, channel: BlockingChannel, task: StudyTask, result: StudyResult, tag: int
    ) -> None:
        """A poison task: its Failure result to the submitter, the message to the dead letters."""
        self._in_flight.discard(tag)
        if not channel.is_open:
            return
        self._publish_result(channel, task, result)
        channel.basic_reject(tag, requeue=False)
        self.processed += 1

    def _reply_unreadable(
        self,
        channel: BlockingChannel,
        properties: pika.BasicProperties,
        body: bytes,
        error: MessageError,
    ) -> None:
        """Tell the submitter (AMQP reply_to) that its message could not be read at all."""
        if not properties.reply_to:
            return
        task_id = unreadable_task_id(body, properties)
        reason = f"the task message could not be read: {error}"
        result = StudyResult(
            task_id=task_id,
            correlation_id=properties.correlation_id or task_id,
            status=TaskStatus.FAILED,
            reports=[
                StudyReport(
                    path_to_study=UNREADABLE_TASK_NAME,
                    processing_status=ProcessingStatus.FAILURE,
                    failure_reason=reason,
                )
            ],
            error=reason,
            adapter_id=self.adapter_id,
        )
        try:
            publish_reply(
                channel,
                result,
                reply_to=properties.reply_to,
                correlation_id=properties.correlation_id or task_id,
            )
        except PublishError as publish_error:
            logger.warning("failure of an unreadable task not delivered: {}", publish_error)

    def _give_back(self, channel: BlockingChannel, tag: int) -> None:
        self._in_flight.discard(tag)
        if channel.is_open:
            channel.basic_nack(tag, requeue=True)

    def _send_progress(
        self, channel: BlockingChannel, task: StudyTask, stage: str, fraction: float, message: str
    ) -> None:
        if not task.reply_to or not channel.is_open:
            return
        update = StudyProgress(
            task_id=task.task_id,
            correlation_id=task.reply_correlation_id,
            stage=stage,
            fraction=fraction,
            message=message,
            adapter_id=self.adapter_id,
        )
        with contextlib.suppress(PublishError):  # progress is best effort
            publish_reply(
                channel,
                update,
                reply_to=task.reply_to,
                correlation_id=task.reply_correlation_id,
                persistent=False,
            )


def unreadable_task_id(body: bytes, properties: pika.BasicProperties) -> str:
    """The id a submitter can match the failure of an unreadable message with: the body's
    ``task_id`` if the body is a JSON object that has a valid one, else the AMQP
    correlation_id or message_id, else a new id."""
    candidates: list[object] = []
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict):
        candidates.append(document.get("task_id"))
    candidates.extend([properties.correlation_id, properties.message_id])
    for candidate in candidates:
        if isinstance(candidate, str):
            try:
                return check_safe_id(candidate)
            except ValueError:
                continue
    return "unreadable-" + new_task_id()

"""Where a queued study stands: tasks ahead of it and an expected wait.

The registry knows every queued task of every door in the order it was queued (tasks leave
the queue in that order: FIFO), so a queued task's place is the number of tasks queued
before it that are still waiting. RabbitMQ tells how many adapters consume the queue. The
expected wait is the number of rounds the adapters need for the tasks ahead and this one,
times the median duration of recent studies (from the registry).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from services.broker.connection import connect, declare_topology
from services.broker.schemas import MODEL_STAGE, QueueTopology
from services.core.config import RabbitMQSettings

QUEUE_STATUS_MAX_AGE_S = 3.0  # one broker round trip per few seconds, not per page refresh


@dataclass(frozen=True)
class QueueStatus:
    waiting: int  # tasks waiting to be prepared, every lane
    workers: int  # adapters alive (their model stage's presence)


def read_queue_status(settings: RabbitMQSettings) -> QueueStatus:
    """The task queue's counts (raises on an unreachable broker); the topology is declared
    first (idempotent), so a fresh broker answers 0 waiting, 0 workers."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="cts-queue-status", give_up_after_s=5)
    try:
        channel = connection.channel()
        declare_topology(channel, topology)
        waiting = sum(
            int(channel.queue_declare(lane, passive=True).method.message_count)
            for lane in topology.task_lanes()
        )
        # Every adapter's model stage consumes its presence queue: the adapters alive.
        presence = channel.queue_declare(topology.presence_queue(MODEL_STAGE), passive=True)
        return QueueStatus(waiting, int(presence.method.consumer_count))
    finally:
        if connection.is_open:
            connection.close()


class QueueMonitor:
    """The queue's status, read at most every ``max_age_s`` (thread-safe); None while the
    broker cannot be reached."""

    def __init__(
        self,
        read: Callable[[], QueueStatus],
        *,
        max_age_s: float = QUEUE_STATUS_MAX_AGE_S,
    ) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._status: QueueStatus | None = None
        self._read_at = -math.inf

    def status(self) -> QueueStatus | None:
        with self._lock:
            if time.monotonic() - self._read_at < self._max_age_s:
                return self._status
            self._read_at = time.monotonic()
            try:
                self._status = self._read()
            except Exception as error:  # noqa: BLE001 - a broker outage must not break the page
                logger.warning("queue status unavailable: {}", type(error).__name__)
                self._status = None
            return self._status


@dataclass(frozen=True)
class QueuePlace:
    ahead: int  # tasks queued before this one and still waiting
    workers: int  # adapters consuming the queue
    expected_wait_s: float | None  # until its result, roughly; None when unknown


def queue_places(
    order: list[str], status: QueueStatus | None, typical_s: float | None
) -> dict[str, QueuePlace]:
    """The place of each task of ``order`` (queued tasks, first queued first); empty when
    the broker cannot be asked how many adapters work."""
    if status is None:
        return {}
    return {
        task_id: QueuePlace(
            ahead=ahead,
            workers=status.workers,
            expected_wait_s=expected_wait_s(ahead, status.workers, typical_s),
        )
        for ahead, task_id in enumerate(order)
    }


def expected_wait_s(ahead: int, workers: int, typical_s: float | None) -> float | None:
    """Seconds until a task with ``ahead`` tasks before it is done; None when unknown."""
    if typical_s is None or workers <= 0:
        return None
    return (ahead // workers + 1) * typical_s

"""Where a queued study stands: tasks ahead of it and an expected wait.

RabbitMQ tells how many tasks wait (ready, not yet taken) and how many adapters consume;
tasks leave in the order they came (FIFO). A queued task's place is not visible in the
broker, so it is bounded from two sides, each an upper bound on the tasks ahead of it:

* the tasks that were waiting when it was queued (nothing can overtake it), and
* the tasks waiting now, less the ones this frontend knows were queued after it.

With one frontend (the usual set-up) the second bound is exact. The expected wait is the
number of rounds the adapters need for the tasks ahead and this one, times the median
duration of the studies this frontend has seen finish.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from services.broker.connection import connect, declare_topology
from services.broker.schemas import QueueTopology
from services.core.config import RabbitMQSettings

QUEUE_STATUS_MAX_AGE_S = 3.0  # one broker round trip per few seconds, not per page refresh
RECENT_DURATIONS = 20


@dataclass(frozen=True)
class QueueStatus:
    waiting: int  # tasks ready in the queue
    workers: int  # adapters consuming it


def read_queue_status(settings: RabbitMQSettings) -> QueueStatus:
    """The task queue's counts (raises on an unreachable broker); the topology is declared
    first (idempotent), so a fresh broker answers 0 waiting, 0 workers."""
    topology = QueueTopology.from_settings(settings)
    connection = connect(settings, name="cts-queue-status", give_up_after_s=5)
    try:
        channel = connection.channel()
        declare_topology(channel, topology)
        frame = channel.queue_declare(topology.task_queue, passive=True)
        return QueueStatus(int(frame.method.message_count), int(frame.method.consumer_count))
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


class StudyDurations:
    """Wall times of the studies this frontend saw finish (thread-safe)."""

    def __init__(self, remembered: int = RECENT_DURATIONS) -> None:
        self._seconds: deque[float] = deque(maxlen=remembered)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, task_id: str, seconds: float) -> None:
        with self._lock:
            if task_id in self._seen or seconds <= 0:
                return
            self._seen.add(task_id)
            self._seconds.append(seconds)

    def typical(self) -> float | None:
        with self._lock:
            return statistics.median(self._seconds) if self._seconds else None


def tasks_ahead(*, queued_behind: int | None, waiting_now: int, known_later_waiting: int) -> int:
    """At most this many tasks are ahead of a queued task (see the module's docstring)."""
    bound = max(waiting_now - 1 - known_later_waiting, 0)
    if queued_behind is not None:
        bound = min(bound, queued_behind)
    return bound


def expected_wait_s(ahead: int, workers: int, typical_s: float | None) -> float | None:
    """Seconds until a task with ``ahead`` tasks before it is done; None when unknown."""
    if typical_s is None or workers <= 0:
        return None
    return (ahead // workers + 1) * typical_s

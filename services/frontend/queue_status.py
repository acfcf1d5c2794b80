"""Where a queued study stands: tasks ahead of it and an expected wait.

The registry knows every unfinished task of every door in the order it was queued; each
stage takes its most urgent lane first, first in first out within a lane, so a queued task's
place is the number of queued tasks before it in that order. RabbitMQ tells how many
adapters work each stage (their presence queues' consumers). The expected wait comes from
the measured stage times of recent results (services/frontend/wait_estimate.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from loguru import logger

from services.broker.connection import connect, declare_topology
from services.broker.schemas import (
    MODEL_STAGE,
    PREPARE_STAGE,
    WAITING_FOR_PREPARATION,
    QueueTopology,
)
from services.broker.storage import handoff_path
from services.core.config import RabbitMQSettings
from services.frontend.wait_estimate import (
    CHECKED_WAITING_LIMIT,
    Pending,
    Where,
    Workers,
    estimate_waits,
    priority_order,
)
from services.registry.records import PipelineTask, Priority, StageTimes, StudyState

QUEUE_STATUS_MAX_AGE_S = 3.0  # one broker round trip per few seconds, not per page refresh


@dataclass(frozen=True)
class QueueStatus:
    waiting: int  # tasks waiting to be prepared, every lane
    workers: int  # adapters alive (their model stage's presence)
    preparers: int | None = None  # adapters' preparation stages alive; None: as workers


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
            for lane in topology.waiting_lanes()
        )
        # Every adapter's model stage consumes its presence queue: the adapters alive.
        presence = channel.queue_declare(topology.presence_queue(MODEL_STAGE), passive=True)
        preparing = channel.queue_declare(topology.presence_queue(PREPARE_STAGE), passive=True)
        return QueueStatus(
            waiting, int(presence.method.consumer_count), int(preparing.method.consumer_count)
        )
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


WAITING = (Where.QUEUED, Where.CHECKED)  # not being prepared yet: they have a place


def in_line(state: StudyState, stage: str | None) -> bool:
    """Queued, or checked first and waiting in a preparation lane: either has a place."""
    return state is StudyState.QUEUED or (
        state is StudyState.PROCESSING and stage == WAITING_FOR_PREPARATION
    )


@dataclass(frozen=True)
class QueuePlace:
    ahead: int  # queued tasks before this one in the order the adapters take them
    workers: int  # adapters alive
    expected_wait_s: float | None  # until its result, roughly; None when unknown


def queue_places(
    tasks: list[Pending],
    status: QueueStatus | None,
    times: StageTimes,
    *,
    check_first: bool = False,
    max_checked_waiting: int = CHECKED_WAITING_LIMIT,
) -> dict[str, QueuePlace]:
    """The place and expected wait of each queued task of ``tasks`` (every unfinished task,
    first queued first); empty when the broker cannot be asked how many adapters work.
    ``check_first``, ``max_checked_waiting``: the adapters' settings (adapter.check_first*)."""
    if status is None:
        return {}
    preparers = status.workers if status.preparers is None else status.preparers
    workers = Workers(prepare=preparers, model=status.workers)
    waits = estimate_waits(
        tasks, workers, times, check_first=check_first, max_checked_waiting=max_checked_waiting
    )
    queued = priority_order([task for task in tasks if task.where in WAITING])
    return {
        task.task_id: QueuePlace(
            ahead=ahead, workers=status.workers, expected_wait_s=waits.get(task.task_id)
        )
        for ahead, task in enumerate(queued)
    }


# The progress stages the model stage reports (services/adapter/stages.py: its "started",
# then the pipeline's inference, findings and the writing of the files).
MODEL_PROGRESS_STAGES = frozenset({"started", "inference", "findings", "writing", "retrying"})


def pending_tasks(rows: list[PipelineTask], storage_root: Path, now: datetime) -> list[Pending]:
    """Where each unfinished task is: queued (in a task lane, or checked and waiting in a
    preparation lane); being prepared; prepared (the preparation's hand-off record is on the
    shared storage) and waiting for the model, or in it."""
    tasks = []
    for row in rows:
        where = Where.QUEUED
        elapsed = 0.0
        if row.state is StudyState.PROCESSING and in_line(row.state, row.stage):
            where = Where.CHECKED
        elif row.state is StudyState.PROCESSING:
            if not handoff_path(storage_root, row.task_id).exists():
                where = Where.PREPARING
                started = row.started_at or now
                elapsed = max((now - started).total_seconds(), 0.0)
            elif row.stage in MODEL_PROGRESS_STAGES:
                where = Where.IN_MODEL
            else:
                where = Where.PREPARED
        tasks.append(Pending(row.task_id, Priority(row.priority.value), where, elapsed))
    return tasks

"""Expected waits of the studies not finished yet, from measurement.

The stack has two stages (services/adapter/stages.py): each adapter alive prepares one task
at a time and runs the model on one prepared task at a time, each stage taking its most
urgent lane first. So the wait of a queued study is not "place x typical duration": it
depends on the places of the more urgent studies, on the studies already prepared and
waiting for the model, on how many of the studies ahead will be refused (they never reach
the model) and on how many adapters work each stage.

:func:`estimate_waits` plays the queue forward with the measured stage times of recent
results (the registry's medians, services/registry/reads.py: preparation of the studies the
model screened, the model stage, the share of studies that needed it). A study ahead
occupies the model for ``model_share`` of a model run on average (it may be refused); the
study itself is expected to need the model, so its wait is the time until its model run
ends. A refused study gets its result sooner; nothing promises later than the estimate.
With the adapters checking first (``adapter.check_first``), a burst is checked before it is
prepared: each new task costs a check (the median preparation of recent refusals, which
stop where a check stops) and its preparation later costs the rest.
It is recomputed on every read (the worklist's refresh), so it follows the queue.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from enum import Enum

from services.registry.records import Priority, StageTimes

RANK = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}  # the lanes' order
CHECKED_WAITING_LIMIT = 8  # adapter.check_first_max_waiting's default
# A check's share of a full preparation while no refusal has been timed: the intake and
# headers of a 300-slice chest CT, 0.77 s of its 1.87 s (benchmarks/README.md, stage rows).
CHECK_SHARE_OF_PREPARATION = 0.4


class Where(str, Enum):
    QUEUED = "queued"  # in a task lane, not checked yet
    CHECKED = "checked"  # checked first, waiting in a preparation lane
    PREPARING = "preparing"
    PREPARED = "prepared"  # in a model lane
    IN_MODEL = "in_model"


@dataclass(frozen=True)
class Pending:
    """A task not finished yet, in the order it was queued."""

    task_id: str
    priority: Priority
    where: Where
    elapsed_s: float = 0.0  # in its current stage, where known (preparing)


@dataclass(frozen=True)
class Workers:
    prepare: int  # adapters alive in the preparation stage
    model: int  # adapters alive in the model stage


def priority_order(tasks: list[Pending]) -> list[Pending]:
    """The order a stage takes them in: the most urgent lane first, each lane first in first
    out (a stable sort of the queued order)."""
    return sorted(tasks, key=lambda task: RANK[task.priority])


def estimate_waits(
    tasks: list[Pending],
    workers: Workers,
    times: StageTimes,
    *,
    check_first: bool = False,
    max_checked_waiting: int = CHECKED_WAITING_LIMIT,
) -> dict[str, float]:
    """Seconds until each task's result if it needs the model (tasks in the model included);
    empty when nothing is measured yet or no adapter works the model stage. Tasks still to
    be prepared get no estimate while no adapter prepares. ``check_first`` and
    ``max_checked_waiting``: the adapters' settings (adapter.check_first*)."""
    if times.prepare_s is None or times.model_s is None or workers.model <= 0:
        return {}
    prepare_s, model_s = times.prepare_s, times.model_s
    check_s = None
    if check_first:
        check_s = times.check_s or prepare_s * CHECK_SHARE_OF_PREPARATION
        check_s = min(check_s, prepare_s)  # a preparation's time includes its check
    ahead_cost = model_s * times.model_share  # a study ahead may be refused
    # When each adapter's model stage is free again; a run in progress is half done on average.
    model_free = [0.0] * max(workers.model - _count(tasks, Where.IN_MODEL), 0)
    model_free += [model_s / 2] * _count(tasks, Where.IN_MODEL)
    heapq.heapify(model_free)
    # Model work: (ready at, lane rank, queued order, task id, cost while ahead of others).
    ready: list[tuple[float, int, int, str, float]] = []
    prepared_at = _prepare(tasks, workers.prepare, prepare_s, check_s, max_checked_waiting)
    for order, task in enumerate(tasks):
        if task.where is Where.PREPARED:
            ready.append((0.0, RANK[task.priority], order, task.task_id, model_s))
        elif task.task_id in prepared_at:
            # A checked study passed its checks: it will most likely need the model.
            cost = model_s if task.where is Where.CHECKED else ahead_cost
            ready.append(
                (prepared_at[task.task_id], RANK[task.priority], order, task.task_id, cost)
            )
    waits = {task.task_id: model_s / 2 for task in tasks if task.where is Where.IN_MODEL}
    waits.update(_run_model(ready, model_free, model_s))
    return waits


def _count(tasks: list[Pending], where: Where) -> int:
    return sum(1 for task in tasks if task.where is where)


def _prepare(
    tasks: list[Pending],
    prepare_workers: int,
    prepare_s: float,
    check_s: float | None,
    max_checked_waiting: int = CHECKED_WAITING_LIMIT,
) -> dict[str, float]:
    """When each task being or to be prepared is ready for the model. The preparation stage
    takes, most urgent priority first, its new tasks before its checked ones; with
    ``check_s`` (checking first), a new task is only checked while others of its priority
    wait, and goes to the back of its priority's checked tasks; once ``max_checked_waiting``
    checked ones wait, one of them is prepared before the next new one is checked."""
    if prepare_workers <= 0:
        return {}
    free = [0.0] * prepare_workers
    done: dict[str, float] = {}
    for task in tasks:
        if task.where is Where.PREPARING:
            start = heapq.heappop(free)
            done[task.task_id] = start + max(prepare_s - task.elapsed_s, 0.0)
            heapq.heappush(free, done[task.task_id])
    new = {rank: deque[str]() for rank in RANK.values()}
    checked = {rank: deque[tuple[float, str]]() for rank in RANK.values()}  # (in its lane at, id)
    for task in tasks:
        if task.where is Where.QUEUED:
            new[RANK[task.priority]].append(task.task_id)
        elif task.where is Where.CHECKED:
            checked[RANK[task.priority]].append((0.0, task.task_id))
    after_check = prepare_s if check_s is None else prepare_s - check_s
    for rank in sorted(RANK.values()):
        while new[rank] or checked[rank]:
            start = heapq.heappop(free)
            in_lane = sum(1 for at, _ in checked[rank] if at <= start)
            if new[rank] and in_lane < max_checked_waiting:
                task_id = new[rank].popleft()
                # Checked first while others of its priority wait: new ones, or checked ones
                # already in their lane (a check still running is not in its lane yet).
                others = bool(new[rank]) or in_lane > 0
                if check_s is not None and others:
                    checked[rank].append((start + check_s, task_id))
                    heapq.heappush(free, start + check_s)
                    continue
                done[task_id] = start + prepare_s
            else:
                in_lane_at, task_id = checked[rank].popleft()
                done[task_id] = max(start, in_lane_at) + after_check
            heapq.heappush(free, done[task_id])
    return done


def _run_model(
    ready: list[tuple[float, int, int, str, float]], free: list[float], model_s: float
) -> dict[str, float]:
    """Each free model stage takes the most urgent prepared task (first prepared first within
    a lane), waiting for the next one to be prepared when none is."""
    upcoming = sorted(ready)  # by the time each is ready
    waiting: list[tuple[int, int, str, float, float]] = []  # (rank, order, id, cost, ready at)
    ends: dict[str, float] = {}
    next_index = 0
    while next_index < len(upcoming) or waiting:
        now = heapq.heappop(free)
        if not waiting and upcoming[next_index][0] > now:
            now = upcoming[next_index][0]  # idle until the next one is prepared
        while next_index < len(upcoming) and upcoming[next_index][0] <= now:
            ready_at, rank, order, task_id, cost = upcoming[next_index]
            heapq.heappush(waiting, (rank, order, task_id, cost, ready_at))
            next_index += 1
        _, _, task_id, cost, ready_at = heapq.heappop(waiting)
        start = max(now, ready_at)  # another model stage saw it prepared later than now
        ends[task_id] = start + model_s  # its own run is a whole one
        heapq.heappush(free, start + cost)
    return ends

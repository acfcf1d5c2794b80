"""Queueing under a backlog (issue 24), through the stack of benchmarks/stack.py (Triton,
one adapter with both stages, RabbitMQ on 127.0.0.1:5672), every baseline in the same run:

* refusals behind chest CTs: ``chests`` chest CTs queued, then refusals (a head CT, an MR,
  a broken archive, in turn); each refusal's latency against the same refusal alone, its
  own preparation time (the adapter's clock), a chest CT alone, and the same backlog on a
  stack with ``adapter.check_first`` off (a stack of its own, started first);
* STAT behind routine: ``routine`` routine chest CTs queued, then one STAT chest CT; where
  its result comes among theirs and its latency against theirs;
* wait estimates: once all of them are queued, each one's expected wait from
  services/frontend/wait_estimate.py (stage times: the medians of the chest results before,
  as the registry keeps them) against the wait measured; error = (estimate - measured) /
  measured.

    .venv/bin/python -m benchmarks.queueing [--repository DIR] [--chests 5] [--refusals 7]
        [--routine 10]

Without --repository it builds the tiny demo model (tests/data/ctvit_tiny.json): its model
stage is short, so the backlog is mostly preparation; a full-size repository gives the
model backlog of the issue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import PROJECT_ROOT
from benchmarks.measure import table_row
from benchmarks.stack import TINY_CONFIG, _StackClient, running_stack
from benchmarks.studies import CHEST_FIXTURE
from convertation.build_cli import demo_build_command
from services.broker.connection import publish_task
from services.broker.schemas import Priority, StudyProgress, StudyResult, StudyTask
from services.frontend.queue_status import pending_tasks
from services.frontend.wait_estimate import Pending, Where, Workers, estimate_waits
from services.registry.records import PipelineTask, StageTimes, StudyState
from services.registry.records import Priority as RecordedPriority

FIXTURES = CHEST_FIXTURE.parent
REFUSED = ("head_ct_gantry_tilt", "mr_brain_t1")  # not a chest CT; not CT


@dataclass(frozen=True)
class Arrival:
    task_id: str
    submitted: float  # perf_counter
    arrived: float
    result: StudyResult

    @property
    def latency_s(self) -> float:
        return self.arrived - self.submitted


@dataclass
class QueueingNumbers:
    chests: int
    chest_alone_s: float
    refusal_alone_s: float  # median over the kinds
    refusal_prepare_s: float  # the adapter's preparation time of the refusals behind (median)
    refusals_behind_s: list[float]
    # The same backlog with adapter.check_first off (each task prepared in full when taken).
    refusals_behind_unchecked_s: list[float]
    routine: int
    stat_latency_s: float
    stat_place: int  # 0: its result came first of the burst
    routine_latencies_s: list[float]
    estimate_errors: list[float]
    reestimate_errors: list[float]  # made again at every result, for those still waiting


def zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, path.name)
    return target


def refused_studies(workdir: Path) -> list[Path]:
    studies = [zip_folder(FIXTURES / name, workdir / f"{name}.zip") for name in REFUSED]
    broken = workdir / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + os.urandom(4096))  # a zip header, then nothing sound
    return [*studies, broken]


def submit(client: _StackClient, study: Path, priority: Priority = Priority.ROUTINE) -> str:
    task_id = uuid.uuid4().hex
    relative = f"uploads/{task_id}/{study.name}"
    (client.storage / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(study, client.storage / relative)
    task = StudyTask(
        task_id=task_id,
        study_path=relative,
        original_filename=study.name,
        reply_to=client.reply_queue,
        priority=priority,
    )
    publish_task(client.channel, client.topology, task)
    return task_id


class Reestimates:
    """The wait estimates made again at every result, as the worklist's refresh makes them:
    each unfinished task placed from its progress messages and its hand-off record on the
    storage (services/frontend/queue_status.pending_tasks), then services/frontend/
    wait_estimate.py; each estimate is compared with the wait measured from that moment."""

    def __init__(self, order: list[tuple[str, Priority]], times: StageTimes, storage: Path):
        self.order, self.times, self.storage = order, times, storage
        self.progress: dict[str, tuple[datetime, str]] = {}  # first progress, last stage
        self.finished: dict[str, float] = {}
        self.made: list[tuple[str, float, float]] = []  # task, when, expected wait

    def seen(self, message: object) -> None:
        if isinstance(message, StudyProgress):
            first = self.progress.get(message.task_id, (message.at, ""))[0]
            self.progress[message.task_id] = (first, message.stage)
        elif isinstance(message, StudyResult):
            now = time.perf_counter()
            self.finished[message.task_id] = now
            self.estimate(now)

    def estimate(self, now: float) -> None:
        rows = [
            PipelineTask(
                task_id=task_id,
                priority=RecordedPriority(priority.value),
                state=StudyState.PROCESSING if task_id in self.progress else StudyState.QUEUED,
                stage=self.progress.get(task_id, (None, None))[1],
                started_at=self.progress.get(task_id, (None, None))[0],
            )
            for task_id, priority in self.order
            if task_id not in self.finished
        ]
        tasks = pending_tasks(rows, self.storage, datetime.now(UTC))
        waits = estimate_waits(tasks, Workers(prepare=1, model=1), self.times, check_first=True)
        self.made += [(task_id, now, wait) for task_id, wait in waits.items()]

    def errors(self) -> list[float]:
        return [
            (wait - (self.finished[task_id] - at)) / (self.finished[task_id] - at)
            for task_id, at, wait in self.made
            if task_id in self.finished and self.finished[task_id] > at
        ]


def wait_all(
    client: _StackClient,
    submitted: dict[str, float],
    timeout_s: float = 1800.0,
    watcher: Reestimates | None = None,
) -> list[Arrival]:
    """Every task's result (refusals included), in the order they arrived."""
    arrivals: list[Arrival] = []
    for message in client.replies(submitted, timeout_s):
        if watcher is not None:
            watcher.seen(message)
        if isinstance(message, StudyResult) and message.task_id in submitted:
            start = submitted[message.task_id]
            arrivals.append(Arrival(message.task_id, start, time.perf_counter(), message))
    return arrivals


def alone(client: _StackClient, study: Path) -> Arrival:
    submitted = time.perf_counter()
    task_id = submit(client, study)
    return wait_all(client, {task_id: submitted})[0]


def stage_times(results: list[StudyResult]) -> StageTimes:
    """What the registry's stage_times would say of these results (services/registry), the
    chests' model share left at 1 (the burst is all chests)."""
    modelled = [r for r in results if r.prepare_seconds is not None and r.model_seconds]
    refused = [r for r in results if r.prepare_seconds is not None and not r.model_seconds]
    return StageTimes(
        prepare_s=statistics.median(r.prepare_seconds or 0.0 for r in modelled),
        model_s=statistics.median(r.model_seconds or 0.0 for r in modelled),
        check_s=statistics.median(r.prepare_seconds or 0.0 for r in refused) if refused else None,
        model_share=1.0,
        samples=len(modelled),
    )


def backlog_with_refusals(
    client: _StackClient, chest: Path, kinds: list[Path], chests: int, refusals: int
) -> tuple[list[Arrival], list[Arrival]]:
    """``chests`` chest CTs queued, then ``refusals`` refusals (the kinds in turn): the
    refusals' and the chests' arrivals."""
    submitted = {}
    for _ in range(chests):
        submitted[submit(client, chest)] = time.perf_counter()
    refusal_ids = set()
    for index in range(refusals):
        task_id = submit(client, kinds[index % len(kinds)])
        submitted[task_id] = time.perf_counter()
        refusal_ids.add(task_id)
    backlog = wait_all(client, submitted)
    behind = [a for a in backlog if a.task_id in refusal_ids]
    return behind, [a for a in backlog if a.task_id not in refusal_ids]


def unchecked_refusals(chest: Path, repository: Path, chests: int, refusals: int) -> list[float]:
    """The refusals' latencies behind the same backlog on a stack whose adapter prepares
    every task in full when it takes it (adapter.check_first off: the design before)."""
    overrides = {"CTS__ADAPTER__CHECK_FIRST": "false"}
    with (
        tempfile.TemporaryDirectory(prefix="cts-bench-queueing-") as folder,
        running_stack(chest, repository, adapters=1, overrides=overrides) as client,
    ):
        kinds = refused_studies(Path(folder))
        behind, _ = backlog_with_refusals(client, chest, kinds, chests, refusals)
    return [a.latency_s for a in behind]


def measure(
    chest: Path, repository: Path, chests: int, refusals: int, routine: int
) -> QueueingNumbers:
    unchecked = unchecked_refusals(chest, repository, chests, refusals)
    with (
        tempfile.TemporaryDirectory(prefix="cts-bench-queueing-") as folder,
        running_stack(chest, repository, adapters=1) as client,
    ):
        kinds = refused_studies(Path(folder))
        chest_alone = alone(client, chest)
        refusals_alone = [alone(client, kind) for kind in kinds]
        refusal_alone = [arrival.latency_s for arrival in refusals_alone]
        measured = [chest_alone.result, *(arrival.result for arrival in refusals_alone)]
        # Refusals behind a backlog of chest CTs.
        behind, chest_arrivals = backlog_with_refusals(client, chest, kinds, chests, refusals)
        measured += [a.result for a in chest_arrivals] + [a.result for a in behind]
        # STAT behind routine, and the wait estimates of them all once queued.
        submitted = {}
        order = []
        for index in range(routine + 1):
            priority = Priority.STAT if index == routine else Priority.ROUTINE
            task_id = submit(client, chest, priority)
            submitted[task_id] = time.perf_counter()
            order.append((task_id, priority))
        times = stage_times(measured)
        pending = [Pending(t, RecordedPriority(p.value), Where.QUEUED) for t, p in order]
        estimates = estimate_waits(pending, Workers(prepare=1, model=1), times, check_first=True)
        watcher = Reestimates(order, times, client.storage)
        burst = wait_all(client, submitted, watcher=watcher)
        stat_id = order[-1][0]
        (stat,) = [a for a in burst if a.task_id == stat_id]
        errors = [
            (estimates[a.task_id] - (a.arrived - submitted[a.task_id]))
            / (a.arrived - submitted[a.task_id])
            for a in burst
        ]
    return QueueingNumbers(
        chests=chests,
        chest_alone_s=chest_alone.latency_s,
        refusal_alone_s=statistics.median(refusal_alone),
        refusal_prepare_s=statistics.median(a.result.prepare_seconds or 0.0 for a in behind),
        refusals_behind_s=[a.latency_s for a in behind],
        refusals_behind_unchecked_s=unchecked,
        routine=routine,
        stat_latency_s=stat.latency_s,
        stat_place=[a.task_id for a in burst].index(stat_id),
        routine_latencies_s=[a.latency_s for a in burst if a.task_id != stat_id],
        estimate_errors=errors,
        reestimate_errors=watcher.errors(),
    )


def tiny_repository(folder: Path) -> Path:
    repository = folder / "repository"
    subprocess.run(
        demo_build_command(repository, ctvit_config=TINY_CONFIG),
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
    )
    return repository


def measure_queueing(
    repository: Path | None, *, chests: int = 5, refusals: int = 7, routine: int = 10
) -> tuple[str, QueueingNumbers]:
    """The numbers and which model gave them; the chest CT is the 30-slice fixture."""
    with tempfile.TemporaryDirectory(prefix="cts-bench-queueing-model-") as folder:
        label = f"model {repository}" if repository else f"tiny demo model ({TINY_CONFIG.name})"
        repository = repository or tiny_repository(Path(folder))
        chest = zip_folder(CHEST_FIXTURE, Path(folder) / "chest.zip")
        return label, measure(chest, repository, chests, refusals, routine)


ISSUE_BEFORE = "53-55 s in the issue's run (one-stage adapters, another machine)"


def queueing_rows(repository: Path | None = None) -> list[str]:
    """The table rows of ``python -m benchmarks.run`` (a row saying why on failure)."""
    title = "queueing under a backlog (issue 24)"
    try:
        label, numbers = measure_queueing(repository)
    except Exception as error:  # noqa: BLE001 - the rest of the table is still worth having
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return [table_row(title, "failed", "", "", reason)]
    return rows_of(label, numbers)


def rows_of(label: str, n: QueueingNumbers) -> list[str]:
    behind = n.refusals_behind_s
    refusal = (
        f"{len(behind)} refusals queued behind {n.chests} chest CTs; latency median "
        f"{statistics.median(behind):.2f} s, slowest {max(behind):.2f} s"
    )
    unchecked = n.refusals_behind_unchecked_s
    baselines = (
        f"same run: the refusal alone {n.refusal_alone_s:.2f} s (its preparation "
        f"{n.refusal_prepare_s:.2f} s), a chest CT alone {n.chest_alone_s:.2f} s; "
        f"adapter.check_first off (every task prepared in full when taken): median "
        f"{statistics.median(unchecked):.2f} s, slowest {max(unchecked):.2f} s; before the two "
        f"stages: {ISSUE_BEFORE}; {label}; goal: its own preparation plus a few seconds"
    )
    slowest_extra = f"+{max(behind) - n.refusal_alone_s:.2f} s over alone"
    routine = statistics.median(n.routine_latencies_s)
    stat = (
        f"STAT {n.stat_latency_s:.2f} s (result {n.stat_place + 1} of {n.routine + 1}); "
        f"routine median {routine:.2f} s"
    )
    stat_notes = (
        f"{n.routine} routine chest CTs queued, then one STAT; 1 adapter; {label}; the STAT "
        "study waits only for the studies already being prepared or in the model"
    )
    within = sum(1 for error in n.estimate_errors if abs(error) <= 0.30)
    errors = ", ".join(f"{100 * error:+.0f}%" for error in n.estimate_errors)
    estimate = f"{within} of {len(n.estimate_errors)} within +-30%"
    estimate_notes = (
        "services/frontend/wait_estimate.py once all are queued (stage times: medians of the "
        f"chest results before) against the measured wait: {errors}; goal: at least 8 of 10"
    )
    again = n.reestimate_errors
    again_within = sum(1 for error in again if abs(error) <= 0.30)
    again_cell = f"{again_within} of {len(again)} within +-30%" if again else "none made"
    again_notes = (
        "made again at every result for the studies still waiting, each placed from its "
        "progress and hand-off record as the frontend places it; median error "
        f"{100 * statistics.median(again):+.0f}%"
        if again
        else ""
    )
    return [
        table_row("refusal latency behind a model backlog", refusal, "", slowest_extra, baselines),
        table_row("STAT vs routine under a backlog", stat, "", "", stat_notes),
        table_row("wait-estimate error", estimate, "", "", estimate_notes),
        table_row(
            "wait-estimate error, re-estimated as the queue moves", again_cell, "", "", again_notes
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--chests", type=int, default=5)
    parser.add_argument("--refusals", type=int, default=7)
    parser.add_argument("--routine", type=int, default=10)
    arguments = parser.parse_args(argv)
    label, numbers = measure_queueing(
        arguments.repository,
        chests=arguments.chests,
        refusals=arguments.refusals,
        routine=arguments.routine,
    )
    print(json.dumps({"model": label, **asdict(numbers)}, indent=2))
    print("\n".join(rows_of(label, numbers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos soak: hundreds of studies through three adapter hosts while a seeded chaos loop kills
adapters (kill -9), restarts the broker, restarts the registry's PostgreSQL (fast stop, or
kill -9 of the database host's processes), pauses Triton (SIGSTOP) and cuts links at random.

At the end every task has exactly one result (in storage, and on the reply queue, where a
copy of it byte for byte may come again: at least once, services/broker/schemas.py) and
exactly its rows in the study registry, final and in the state its result says; the task queue is
empty, the dead-letter queue holds exactly the tasks the dead-letter rules gave up on (each
with its Failure result), and no adapter left temporary files or shared-memory regions
behind, nor the database host a process or its data folder.

CI runs 200 studies (a few minutes). The long soak is the same test with more:

    CTS_CHAOS_STUDIES=1000 CTS_CHAOS_MINUTES=60 CTS_CHAOS_SEED=7 \\
        .venv/bin/python -m pytest tests/test_chaos_soak.py -m slow -s

(studies are then submitted evenly over most of the minutes, so the chaos meets a queue that
is never empty for long; the table and the counts are printed at the end).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cluster_support import Cluster, started_cluster
from fault_support import (
    Outcome,
    SentStudy,
    TaskClient,
    count_outcome,
    outcome_table,
    registry_mismatches,
    report_rows,
    study_zips,
    triton_leftovers,
)
from stack_support import wait_for

from services.broker.schemas import TaskStatus
from services.broker.storage import load_result

pytestmark = [pytest.mark.rabbitmq, pytest.mark.triton, pytest.mark.slow]

STUDIES = int(os.environ.get("CTS_CHAOS_STUDIES", "200"))
MINUTES = float(os.environ.get("CTS_CHAOS_MINUTES", "0"))  # 0: submit everything at once
SEED = int(os.environ.get("CTS_CHAOS_SEED", "14"))
ADAPTERS = 3
# Seconds between two faults, and how long a pause or a cut lasts.
CHAOS_GAP_S = (3.0, 9.0)
OUTAGE_S = (3.0, 15.0)
ADAPTER_DOWN_S = (1.0, 6.0)
# After the chaos: every result, then the sweeps of the surviving adapters.
FINAL_RESULTS_TIMEOUT_S = 600.0
SWEEP_TIMEOUT_S = 120.0
# The study mix: chests go through both Triton models, heads through the chest check's
# network only, MR studies are refused before any model request.
MIX = (("chest", 6), ("head", 2), ("mr", 2))
MEASUREMENTS: list[str] = []


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest) -> Iterator[list[Outcome]]:
    yield from outcome_table(request, "chaos soak: nothing lost, nothing duplicated", MEASUREMENTS)


# A fault can make an adapter send a result again (services/broker/schemas.py, "At least
# once"): each of its two stages may be between a reply's confirm and its delivered mark
# when it is killed, or lose a confirm when its link to the broker breaks.
RESENDS_PER_ADAPTER = 2


@dataclass
class ChaosLog:
    events: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    # The results the faults so far may have made an adapter send again, at most.
    resends_allowed: int = 0

    def add(self, kind: str, detail: str, *, adapters_hit: int = 0) -> None:
        """``adapters_hit``: the adapters whose link to the broker the fault breaks."""
        self.events[kind] += 1
        self.resends_allowed += adapters_hit * RESENDS_PER_ADAPTER
        self.lines.append(f"{time.strftime('%H:%M:%S')} {kind}: {detail}")


class ChaosMonkey:
    """One fault at a time, chosen and timed by a seeded generator; every fault is undone
    before the next, and :meth:`heal` undoes whatever is left when it stops."""

    def __init__(self, cluster: Cluster, seed: int) -> None:
        self.cluster = cluster
        self.random = random.Random(seed)
        self.log = ChaosLog()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self.error: BaseException | None = None
        self.actions: dict[str, Callable[[], None]] = {
            "kill -9 adapter": self.kill_adapter,
            "restart broker": self.restart_broker,
            "restart database": self.restart_database,
            "pause Triton": self.pause_triton,
            "cut link": self.cut_link,
        }

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=300)
        self.heal()
        if self.error is not None:
            raise AssertionError(f"the chaos loop failed: {self.error!r}") from self.error

    def _sleep(self, bounds: tuple[float, float]) -> None:
        time.sleep(self.random.uniform(*bounds))  # never cut short: a fault is always undone

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.random.uniform(*CHAOS_GAP_S)):
                name = self.random.choice(sorted(self.actions))
                self.actions[name]()
        except BaseException as error:  # noqa: BLE001 - reported by finish()
            self.error = error

    def kill_adapter(self) -> None:
        name = self.random.choice(self.cluster.adapter_names)
        if not self.cluster.alive(name):
            return
        self.cluster.kill(name)
        self.log.add("kill -9 adapter", name, adapters_hit=1)
        self._sleep(ADAPTER_DOWN_S)
        self.cluster.relaunch(name)

    def restart_broker(self) -> None:
        self.log.add("restart broker", "rabbitmqctl stop, rabbitmq-server", adapters_hit=ADAPTERS)
        self.cluster.broker.stop()
        self.cluster.broker.start()

    def restart_database(self) -> None:
        crash = self.random.random() < 0.5
        how = "kill -9 (every process of the db host), start" if crash else "fast stop, start"
        self.log.add("restart database", how)
        self.cluster.restart_database(crash=crash)

    def pause_triton(self) -> None:
        seconds = self.random.uniform(*OUTAGE_S)
        self.log.add("pause Triton", f"SIGSTOP {seconds:.0f} s")
        self.cluster.signal(self.cluster.triton_name, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.cluster.signal(self.cluster.triton_name, signal.SIGCONT)

    def cut_link(self) -> None:
        hosts = [self.cluster.broker_host, self.cluster.triton_host, *self.cluster.hosts.values()]
        host = self.random.choice(hosts)
        seconds = self.random.uniform(*OUTAGE_S)
        # One adapter per host; the broker's host cuts every adapter off; Triton's none.
        hit = {self.cluster.broker_host.name: ADAPTERS, self.cluster.triton_host.name: 0}
        self.log.add("cut link", f"{host.name} {seconds:.0f} s", adapters_hit=hit.get(host.name, 1))
        host.cut()
        try:
            time.sleep(seconds)
        finally:
            host.restore()

    def heal(self) -> None:
        cluster = self.cluster
        for host in [cluster.broker_host, cluster.triton_host, *cluster.hosts.values()]:
            host.restore()
        cluster.signal(cluster.triton_name, signal.SIGCONT)
        if cluster.broker.process is None or cluster.broker.process.poll() is not None:
            cluster.broker.reap()
            cluster.broker.start()
        cluster.database.ensure_running()
        for name in cluster.adapter_names:
            if not cluster.alive(name):
                cluster.relaunch(name)


@pytest.fixture(scope="module")
def cluster(
    tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("chaos")
    yield from started_cluster(workdir, tiny_model_repository, adapters=ADAPTERS, name="chaos")


def test_chaos_soak_loses_and_duplicates_nothing(
    cluster: Cluster, fixtures_dir: Path, outcomes: list[Outcome]
) -> None:
    # In the shared storage: each upload is a hard link of one of these (hundreds, one copy).
    zips = study_zips(fixtures_dir, cluster.storage / "z", ("chest", "head", "mr"))
    client = TaskClient(
        cluster.rabbitmq,
        cluster.storage,
        f"{cluster.prefix}.replies.chaos",
        submitted_by="chaos-soak",
    )
    client.poll()
    plan = random.Random(SEED).choices(
        [kind for kind, _ in MIX], weights=[weight for _, weight in MIX], k=STUDIES
    )
    monkey = ChaosMonkey(cluster, SEED)
    started = time.monotonic()
    sent: list[SentStudy] = []
    # Paced submission for a long soak: evenly over 80% of the minutes.
    spacing_s = MINUTES * 60 * 0.8 / STUDIES if MINUTES else 0.0
    monkey.start()
    try:
        for index, kind in enumerate(plan):
            # On a wall-clock schedule: the time a submission takes does not add up.
            while spacing_s and time.monotonic() < started + index * spacing_s:
                client.poll()
                time.sleep(min(1.0, spacing_s))
            sent.append(client.submit(zips[kind], f"{kind}-{index}.zip", kind, link=True))

        def all_results() -> bool:
            client.poll()
            chaos_over = MINUTES and time.monotonic() - started > MINUTES * 60
            return bool(chaos_over) or all(study.task_id in client.results for study in sent)

        wait_for(all_results, max(MINUTES * 60, 0) + FINAL_RESULTS_TIMEOUT_S, "the soak", 1.0)
    finally:
        monkey.finish()
    chaos_s = time.monotonic() - started
    cluster.wait_for_adapters()
    client.wait_for_results(sent, FINAL_RESULTS_TIMEOUT_S)
    client.settle(5.0)
    elapsed_s = time.monotonic() - started
    client.close()

    # Exactly one result per task, where the submitter looks and in storage.
    seen = client.distinct()  # a result sent again: bounded below
    given_up = [
        study
        for study in sent
        if client.result(study.task_id).status is TaskStatus.FAILED
        and "given up after" in (client.result(study.task_id).error or "")
    ]
    # Exactly its rows in the registry, final, in the state its result says.
    registry = cluster.open_registry()
    try:
        registry_lost, registry_duplicated = registry_mismatches(registry, sent, client.results_of)
    finally:
        registry.close()
    rows = sum(len(client.result(study.task_id).reports) for study in sent)
    outcome = count_outcome(
        f"chaos soak, seed {SEED}: {sum(monkey.log.events.values())} faults",
        sent,
        seen,
        cluster.storage,
        note=(
            ", ".join(f"{kind} x{count}" for kind, count in sorted(monkey.log.events.items()))
            + f"; {len(given_up)} dead-lettered after {cluster.rabbitmq.max_deliveries} "
            f"deliveries; {len(sent)} studies in {elapsed_s / 60:.1f} min; registry "
            f"(PostgreSQL): {rows} rows expected, {registry_lost} missing or not final, "
            f"{registry_duplicated} extra; {sum(client.repeats.values())} results sent again "
            f"byte for byte (at least once; the faults allowed {monkey.log.resends_allowed})"
        ),
    )
    outcome.lost += registry_lost
    outcome.duplicated += registry_duplicated
    outcomes.append(outcome)
    if cluster.triton_restarts:
        MEASUREMENTS.append(
            "Triton exited on its own and was restarted by the supervisor at "
            + ", ".join(cluster.triton_restarts)
        )
    MEASUREMENTS.extend(["chaos log:", *(f"  {line}" for line in monkey.log.lines)])
    assert (outcome.lost, outcome.duplicated) == (0, 0), (outcome, copies(sent, seen, cluster))
    assert (registry_lost, registry_duplicated) == (0, 0)
    assert outcome.results == outcome.sent
    # A result is sent again only across a fault (ChaosLog.add), never as a habit: the
    # delivered mark keeps every other redelivery from sending it twice.
    assert sum(client.repeats.values()) <= monkey.log.resends_allowed, (
        client.repeats,
        monkey.log.events,
    )
    assert all(load_result(cluster.storage, study.task_id) for study in sent)
    # Every kind of fault happened (seeded: the same faults every run).
    assert set(monkey.actions) <= set(monkey.log.events), monkey.log.events
    assert chaos_s > 0

    # Nothing left in the work queue; the dead letters are exactly the tasks given up on.
    queues = cluster.broker.queues()
    for lane in (*cluster.topology.waiting_lanes(), *cluster.topology.model_lanes()):
        assert queues.get(lane, (0, 0))[:2] == (0, 0), (lane, queues)
    dead_letters = queues.get(cluster.topology.dead_letter_queue, (0, 0, 0))[0]
    assert dead_letters == len(given_up), (dead_letters, [s.name for s in given_up])
    assert queues[f"{cluster.prefix}.replies.chaos"][:2] == (0, 0)

    # The adapters swept what the killed ones left (unpacked studies, shared memory), and
    # nothing of any adapter or of Triton is left once the cluster stopped.
    running = {cluster.pid(name) for name in cluster.adapter_names}
    dead = cluster.adapter_pids - running
    wait_for(
        lambda: not adapter_leftovers(dead),
        SWEEP_TIMEOUT_S,
        "the killed adapters' leftovers swept",
        interval_s=2.0,
    )
    triton_paths = triton_leftovers(cluster.triton_host.pids())
    assert triton_paths  # its backend folder at least: the check below means something
    database_processes = {pid: started_at(pid) for pid in cluster.db_host.pids()}
    assert cluster.database.postmasters[-1] in database_processes  # the check means something
    cluster.stop()
    assert not adapter_leftovers(cluster.adapter_pids)
    assert not [path for path in triton_paths if path.exists()]
    assert not [pid for pid, start in database_processes.items() if started_at(pid) == start]
    assert not cluster.database.base.exists()  # its data folder removed


def copies(sent: list[SentStudy], seen: Counter[str], cluster: Cluster) -> dict[str, str]:
    """What was duplicated or lost, study by study (for a failure's message)."""
    found = {}
    for study in sent:
        stored = load_result(cluster.storage, study.task_id)
        rows = report_rows(cluster.storage, study.task_id)
        if seen[study.task_id] != 1 or stored is None or rows > len(stored.reports):
            found[study.name] = (
                f"task {study.task_id}: {seen[study.task_id]} distinct replies, "
                f"{'a' if stored else 'no'} stored result, {rows} report rows"
            )
    return found


def adapter_leftovers(pids: set[int]) -> list[Path]:
    """Unpacked studies and shared-memory regions of these adapter processes."""
    temp = Path(tempfile.gettempdir())
    found: list[Path] = []
    for pid in pids:
        found.extend(path for path in [temp / f"cts-adapter-{pid}"] if path.exists())
        found.extend(Path("/dev/shm").glob(f"cts_{pid}_*"))
    return found


def started_at(pid: int) -> str | None:
    """When the process started (clock ticks since boot): a pid used again is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]

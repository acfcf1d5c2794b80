"""The study registry at 10k and 100k studies on SQLite and PostgreSQL: the worklist's first
page, the REST API's pages and filters, a patient's studies (median and p95 of warm runs,
goal < 200 ms each) and the recorder's writes per second (README: "Study registry").

    .venv/bin/python -m benchmarks.registry [--sizes 10000 100000] [--backends sqlite postgresql]
        [--repetitions N] [--write-tasks N] [--explain] [--postgres CONNINFO]

Each size is drawn once (benchmarks/registry_data.py) and bulk-loaded into a fresh registry
of each backend: SQLite in a temporary file, PostgreSQL in a throwaway database
``cts_bench_<random>`` (dropped afterwards); the schema comes from the registry's migrations.
The reads go through ``Registry`` as the worklist, the study view and the REST API call it;
the writes are a door's submission, an adapter's progress messages and the task's result,
one transaction each, from one writer, into the loaded registry. ``--explain`` prints each
read's query plan. Prints the table (markdown).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, event, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError

from benchmarks.measure import table_row
from benchmarks.registry_data import (
    PROGRESS_STAGES,
    WORKLIST_VIEWER,
    Patient,
    SyntheticRegistry,
    SyntheticStudy,
    progress_messages,
    result_message,
    row_columns,
    synthetic_registry,
)
from services.registry import Door, Registry, StudyFilter, StudyState
from services.registry.database import create_registry_engine, upgrade
from services.registry.models import HiddenStudy, Study
from services.registry.reads import encode_cursor

M = TypeVar("M")
BACKENDS = ("sqlite", "postgresql")
BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
DEFAULT_SIZES = (10_000,)
POSTGRES_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=5"
GOAL_MS = 200.0
WORKLIST_ROWS = 500  # what the worklist page lists (services/frontend/service.py)
API_PAGE = 50  # the REST API's default page
LOAD_BATCH = 5000  # rows per INSERT transaction of the bulk load
WARM_UP_RUNS = 2
WRITE_SEED = 7  # the write benchmark's tasks are not the loaded ones


@dataclass(frozen=True)
class Timing:
    """One read, timed warm: milliseconds of each run and the rows it returned."""

    label: str
    runs_ms: list[float]
    rows: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def p95_ms(self) -> float:
        ordered = sorted(self.runs_ms)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank


@dataclass(frozen=True)
class WriteRates:
    """Writes per second of each kind, one writer, each write its own transaction."""

    submissions: float
    progress: float
    results: float
    tasks: float  # whole tasks: a submission, the progress messages, the result
    n_tasks: int


@dataclass
class BackendResult:
    backend: str
    size: int
    load_s: float = 0.0
    reads: list[Timing] = field(default_factory=list)
    writes: WriteRates | None = None
    error: str | None = None  # why nothing was measured
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute, before the reads, after the writes

    @property
    def title(self) -> str:
        size = f"{self.size // 1000}k" if self.size % 1000 == 0 else f"{self.size:,}"
        return f"{BACKEND_NAMES[self.backend]} {size}"


# -- the databases --------------------------------------------------------------------------


@contextmanager
def empty_database(backend: str, folder: Path, admin: str = POSTGRES_ADMIN) -> Iterator[URL]:
    """A URL of an empty database: a SQLite file in ``folder``, or a new PostgreSQL database
    (dropped afterwards, connections and all)."""
    if backend == "sqlite":
        yield URL.create(
            "sqlite", database=str(folder / f"registry-{uuid.uuid4().hex[:8]}.sqlite3")
        )
        return
    name = f"cts_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            info = connection.info
            yield URL.create(
                "postgresql+psycopg",
                username=info.user,
                host=info.host,
                port=info.port,
                database=name,
            )
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load(url: URL, synthetic: SyntheticRegistry, rows: Sequence[dict[str, Any]]) -> float:
    """The registry at the newest schema with ``rows`` and the hidden rows; seconds taken."""
    started = time.perf_counter()
    upgrade(url)
    engine = create_registry_engine(url)
    try:
        for start in range(0, len(rows), LOAD_BATCH):
            with engine.begin() as connection:
                connection.execute(insert(Study), list(rows[start : start + LOAD_BATCH]))
        with engine.begin() as connection:
            # Inserted in order into an empty table: the n-th row has the n-th id.
            ids = list(connection.scalars(select(Study.id).order_by(Study.id)))
            hidden = [
                {"study_id": ids[position], "viewer": viewer, "hidden_at": synthetic.end}
                for viewer, positions in synthetic.hidden_positions().items()
                for position in positions
            ]
            connection.execute(insert(HiddenStudy), hidden)
        if url.get_backend_name() == "postgresql":
            # Autovacuum analyses a table this changed within a minute or so; a registry
            # loaded a minute ago is what a deployment has.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


# -- the reads ------------------------------------------------------------------------------

Read = Callable[[Registry], int]  # one call as a page makes it; the rows it returned


def _reads(registry: Registry, synthetic: SyntheticRegistry) -> list[tuple[str, list[Read]]]:
    """Each read with the calls its runs cycle through (a patient's studies: several
    patients, as several study views would ask)."""
    middle = synthetic.studies[len(synthetic.studies) // 2]  # half a year back: done
    rest_first = registry.list_studies(StudyFilter(), limit=API_PAGE)
    middle_record = registry.study(middle.task_id, middle.report_index)
    half_way = encode_cursor(middle_record) if middle_record else None
    window_end = synthetic.end - timedelta(days=60)
    door_window = StudyFilter(
        doors=[Door.DICOM],
        received_from=(window_end - timedelta(days=30)).date(),
        received_to=window_end.date(),
    )
    family = (
        middle_record.identity.patient_name or ""
        if middle_record and middle_record.identity
        else ""
    )
    family = family.split("^")[0]
    accession = middle_record.accession_number if middle_record else None
    patients = synthetic.patients[:: max(1, len(synthetic.patients) // 20)][:20]

    def page(wanted: StudyFilter, limit: int, cursor: str | None = None) -> Read:
        return lambda r: len(r.list_studies(wanted, limit=limit, cursor=cursor).items)

    def studies_of(patient: Patient) -> Read:
        return lambda r: len(r.patient_studies(patient.patient_id, patient.issuer))

    worklist = StudyFilter(hidden_for=WORKLIST_VIEWER)
    queued = StudyFilter(states=[StudyState.QUEUED])  # a client polling what still waits
    return [
        (f"worklist: first page ({WORKLIST_ROWS}, less hidden)", [page(worklist, WORKLIST_ROWS)]),
        (f"worklist: first page ({API_PAGE}, less hidden)", [page(worklist, API_PAGE)]),
        (f"REST: next page ({API_PAGE}, cursor)", [page(StudyFilter(), API_PAGE, rest_first.next)]),
        (
            f"REST: a page half-way back ({API_PAGE}, cursor)",
            [page(StudyFilter(), API_PAGE, half_way)],
        ),
        (f"REST: door + 30 days ({API_PAGE})", [page(door_window, API_PAGE)]),
        (f"REST: state = queued ({API_PAGE})", [page(queued, API_PAGE)]),
        (f"REST: q = a family name ({API_PAGE})", [page(StudyFilter(text=family), API_PAGE)]),
        (
            f"REST: q = an accession number ({API_PAGE})",
            [page(StudyFilter(text=accession), API_PAGE)],
        ),
        (
            "study view: a patient's studies",
            [studies_of(patient) for patient in patients],
        ),
    ]


def time_read(registry: Registry, label: str, calls: list[Read], repetitions: int) -> Timing:
    """Warm-up runs, then ``repetitions`` timed ones (cycling through ``calls``)."""
    for call in calls[:WARM_UP_RUNS] * WARM_UP_RUNS:
        call(registry)
    runs_ms, rows = [], 0
    for run in range(repetitions):
        call = calls[run % len(calls)]
        started = time.perf_counter()
        rows = call(registry)
        runs_ms.append(1000 * (time.perf_counter() - started))
    return Timing(label, runs_ms, rows)


# -- the writes -----------------------------------------------------------------------------


def _tasks(n_tasks: int) -> list[list[SyntheticStudy]]:
    """``n_tasks`` finished tasks (their studies each), not in any loaded registry."""
    studies = n_tasks + n_tasks // 10 + 1  # a few tasks hold two
    drawn = synthetic_registry(studies, seed=WRITE_SEED, full_reports=True, backlog=False)
    tasks: dict[str, list[SyntheticStudy]] = {}
    for study in drawn.studies:
        tasks.setdefault(study.task_id, []).append(study)
    return list(tasks.values())[:n_tasks]


class _WriteClock:
    """Seconds and counts of each kind of write."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def time(self, kind: str, write: Callable[[M], bool], message: M) -> None:
        started = time.perf_counter()
        if not write(message):
            raise RuntimeError(f"a {kind} of a new task was not written")
        self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - started
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def rate(self, kind: str) -> float:
        return self.counts[kind] / self.seconds[kind]


def measure_writes(registry: Registry, n_tasks: int) -> WriteRates:
    """Each task as its door and adapter report it: submission, progress, result."""
    clock = _WriteClock()
    tasks = _tasks(n_tasks)
    for studies in tasks:
        now = datetime.now(UTC)  # a new task arrives now: the end of the received index
        arrived = {"received_at": now, "queued_at": now}
        clock.time(
            "submission",
            registry.record_submission,
            studies[0].submission().model_copy(update=arrived),
        )
        for message in progress_messages(studies[0], now):
            clock.time("progress", registry.record_progress, message)
        clock.time("result", registry.record_result, result_message(studies))
    return WriteRates(
        submissions=clock.rate("submission"),
        progress=clock.rate("progress"),
        results=clock.rate("result"),
        tasks=len(tasks) / sum(clock.seconds.values()),
        n_tasks=len(tasks),
    )


# -- query plans ----------------------------------------------------------------------------


@contextmanager
def captured_statements() -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and parameters) any engine runs meanwhile."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", capture)


def query_plan(url: URL, statement: str, parameters: Any) -> str:
    """EXPLAIN QUERY PLAN (SQLite) or EXPLAIN ANALYZE (PostgreSQL) of one statement."""
    engine = create_registry_engine(url)
    explain = "EXPLAIN QUERY PLAN " if url.get_backend_name() == "sqlite" else "EXPLAIN ANALYZE "
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(explain + statement, parameters).fetchall()
    finally:
        engine.dispose()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)


def print_plans(url: URL, registry: Registry, reads: list[tuple[str, list[Read]]]) -> None:
    for label, calls in reads:
        with captured_statements() as statements:
            calls[0](registry)
        queries = [(s, p) for s, p in statements if s.lstrip().upper().startswith("SELECT")]
        for statement, parameters in queries[-1:]:  # the read's own query, not the pragmas
            print(
                f"--- {label}\n{statement}\n{parameters}\n{query_plan(url, statement, parameters)}"
            )


# -- one backend, one size ------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    repetitions: int = 20
    write_tasks: int = 100
    explain: bool = False
    postgres: str = POSTGRES_ADMIN


def measure(
    backend: str, synthetic: SyntheticRegistry, rows: Sequence[dict[str, Any]], options: Options
) -> BackendResult:
    """Load, read, write: one registry of one backend."""
    result = BackendResult(backend, len(rows))
    with (
        tempfile.TemporaryDirectory(prefix="cts-bench-registry-") as folder,
        empty_database(backend, Path(folder), options.postgres) as url,
    ):
        result.load_s = load(url, synthetic, rows)
        registry = Registry(url)
        before = os.getloadavg()[0]
        try:
            reads = _reads(registry, synthetic)
            if options.explain:
                print_plans(url, registry, reads)
            result.reads = [
                time_read(registry, label, calls, options.repetitions) for label, calls in reads
            ]
            result.writes = measure_writes(registry, options.write_tasks)
        finally:
            registry.close()
        result.load_average = (before, os.getloadavg()[0])
    return result


def measure_all(
    sizes: Sequence[int], backends: Sequence[str], options: Options
) -> list[BackendResult]:
    """Every size on every backend; a backend that cannot be reached gives an error result."""
    results = []
    for size in sizes:
        print(f"registry: drawing {size:,} studies ...", flush=True)
        synthetic = synthetic_registry(size)
        rows = [row_columns(study) for study in synthetic.studies]
        for backend in backends:
            print(f"registry: {BACKEND_NAMES[backend]}, {size:,} studies ...", flush=True)
            # The drawn rows stay for the next backend: frozen, the collector does not walk
            # them during the timed reads (a service's heap holds none of them).
            gc.collect()
            gc.freeze()
            try:
                results.append(measure(backend, synthetic, rows, options))
            except (OSError, psycopg.Error, SQLAlchemyError) as error:
                reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
                results.append(BackendResult(backend, size, error=reason))
            finally:
                gc.unfreeze()
    return results


# -- the table ------------------------------------------------------------------------------


def _read_cell(timing: Timing) -> str:
    missed = " **(> goal)**" if timing.p95_ms >= GOAL_MS else ""
    return f"{timing.median_ms:.1f} / {timing.p95_ms:.1f} ms{missed}"


def table(results: list[BackendResult], repetitions: int) -> list[str]:
    """The registry's table: a row per read and per kind of write, a column per registry."""
    measured = [r for r in results if r.error is None]
    header = table_row(
        f"study registry: median / p95 of {repetitions} warm runs",
        *(r.title for r in results),
        "notes",
    )
    lines = [header, "|---" * (len(results) + 2) + "|"]
    labels = [timing.label for timing in measured[0].reads] if measured else []
    for index, label in enumerate(labels):
        cells = [_read_cell(r.reads[index]) if r.error is None else "-" for r in results]
        rows_returned = "/".join(str(r.reads[index].rows) for r in measured)
        lines.append(
            table_row(label, *cells, f"rows returned: {rows_returned}; goal < {GOAL_MS:.0f} ms")
        )
    lines += _write_rows(results)
    errors = "; ".join(f"{r.title}: {r.error}" for r in results if r.error)
    cells = ["failed" if r.error else f"{r.load_s:.1f} s" for r in results]
    how = f"Core INSERTs of {LOAD_BATCH:,} rows; PostgreSQL then VACUUM ANALYZE (autovacuum's job)"
    lines.append(table_row("bulk load (migrations + rows + hidden rows)", *cells, errors or how))
    cells = ["" if r.error else "{:.1f} / {:.1f}".format(*r.load_average) for r in results]
    lines.append(
        table_row("machine: 1-minute load average, before the reads / after the writes", *cells, "")
    )
    return lines


def _write_rows(results: list[BackendResult]) -> list[str]:
    per_task = len(PROGRESS_STAGES)
    kinds: list[tuple[str, Callable[[WriteRates], float], str]] = [
        ("writes: record_submission per second", lambda w: w.submissions, "a door's new task"),
        ("writes: record_progress per second", lambda w: w.progress, f"{per_task} per task"),
        ("writes: record_result per second", lambda w: w.results, "3% of the tasks two studies"),
        (
            "writes: whole tasks per second",
            lambda w: w.tasks,
            f"1 submission + {per_task} progress + 1 result, one writer, sequential",
        ),
    ]
    rows = []
    for title, rate, notes in kinds:
        cells = [f"{rate(r.writes):.0f}" if r.writes else "-" for r in results]
        tasks = next((r.writes.n_tasks for r in results if r.writes), 0)
        rows.append(table_row(title, *cells, f"{notes}; {tasks} tasks"))
    return rows


def registry_rows(sizes: Sequence[int], options: Options) -> list[str]:
    """What ``python -m benchmarks.run`` adds: the registry's table."""
    return table(measure_all(sizes, BACKENDS, options), options.repetitions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.registry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="studies per registry")
    add("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    add("--repetitions", type=int, default=Options.repetitions, help="timed runs per read")
    add("--write-tasks", type=int, default=Options.write_tasks, help="tasks the writer records")
    add("--explain", action="store_true", help="print each read's query plan")
    add("--postgres", default=POSTGRES_ADMIN, help="libpq conninfo of an admin connection")
    arguments = parser.parse_args(argv)
    options = Options(
        arguments.repetitions, arguments.write_tasks, arguments.explain, arguments.postgres
    )
    results = measure_all(arguments.sizes, arguments.backends, options)
    print("\n".join(table(results, options.repetitions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

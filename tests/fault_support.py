"""Helpers of the fault-injection suite (tests/test_fault_suite.py). Not a test module.

* :class:`LocalStack` starts the real local stack with ``start.sh`` and then breaks it:
  kill -9 or freeze (SIGSTOP) a service, crash Triton, stop the frontend, and launch a
  service again exactly as ``start.sh`` did (same command line, environment, working
  directory, own session, same log file; the pid file is updated so ``stop.sh`` still
  stops everything).
* :class:`TaskClient` is the submitting system of the README: it copies a study into the
  shared storage, publishes a StudyTask as plain JSON and reads its own reply queue. It
  reconnects when the broker restarts, and keeps every reply it ever read.
* :func:`count_outcome` turns what reached the user (replies, or the page) and what is in
  ``storage/results`` into the suite's table row: sent, results, lost, duplicated;
  :func:`replies_tally` counts and records a scenario from the replies, and
  :func:`outcome_table` prints the rows (the fault suite, multi-host and chaos soak tests).
* :func:`restart_rabbitmq` restarts the system RabbitMQ and always leaves it running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openpyxl
import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from stack_support import PROJECT_ROOT, wait_for, zip_directory

from services.adapter.handoff import read_check, read_handoff
from services.broker.connection import CONNECTION_ERRORS, connect
from services.broker.schemas import (
    QueueTopology,
    StudyProgress,
    StudyResult,
    TaskStatus,
    decode_message,
)
from services.broker.storage import load_result, result_files_dir
from services.core.config import RabbitMQSettings
from services.core.schemas import ProcessingStatus
from services.registry import Registry, StudyRecord, StudyState
from services.triton.local_server import free_local_ports

RABBITMQCTL_TIMEOUT_S = 120


# -- processes -------------------------------------------------------------------------------


@dataclass
class Service:
    """How start.sh launched one service, read from /proc while it ran."""

    name: str
    pid: int
    argv: list[str]
    environment: dict[str, str]
    cwd: str
    child: subprocess.Popen[bytes] | None = None  # set when this module launched it


def _read_process(pid: int) -> tuple[list[str], dict[str, str], str]:
    proc = Path(f"/proc/{pid}")
    argv = [part.decode() for part in proc.joinpath("cmdline").read_bytes().split(b"\0") if part]
    environment = {}
    for entry in proc.joinpath("environ").read_bytes().split(b"\0"):
        key, separator, value = entry.decode(errors="replace").partition("=")
        if separator:
            environment[key] = value
    return argv, environment, os.readlink(proc / "cwd")


def process_alive(pid: int) -> bool:
    """Running or stopped, not gone and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def process_groups(group_ids: set[int]) -> set[int]:
    """Processes (not zombies) whose process group is one of ``group_ids``."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) in group_ids:
            members.add(int(entry.name))
    return members


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class StackPorts:
    frontend: int
    triton_http: int
    triton_grpc: int
    triton_metrics: int


def triton_leftovers(pids: list[int]) -> set[Path]:
    """What the Triton processes ``pids`` would leave behind if killed: the python backend
    stubs' shared-memory regions and the launcher's backend folder."""
    leftovers: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)  # address perms offset dev inode path
            path = parts[5] if len(parts) == 6 else ""
            if path.startswith("/dev/shm/triton_python_backend_shm_region_"):
                leftovers.add(Path(path.removesuffix(" (deleted)")))
        executable = argv[0].decode(errors="replace")
        if "/cts-tritonserver-" in executable:
            workdir = executable.split("/backends/")[0]
            leftovers.add(Path(workdir))
    return leftovers


def remove_paths(paths: set[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class LocalStack:
    """The stack of ``start.sh --local`` on this test's storage, prefix and ports."""

    def __init__(
        self,
        *,
        repository: Path,
        storage: Path,
        prefix: str,
        ports: StackPorts,
        adapters: int,
        extra_arguments: tuple[str, ...] = (),
    ) -> None:
        self.repository = repository
        self.extra_arguments = extra_arguments  # more start.sh options
        self.storage = storage
        self.prefix = prefix
        self.ports = ports
        self.adapter_names = [f"adapter-{index}" for index in range(1, adapters + 1)]
        self.run_dir = storage / "run"
        self.log_dir = storage / "logs"
        self.services: dict[str, Service] = {}
        self.launched_groups: set[int] = set()  # every service process group, relaunches too
        # Start.sh is run without any CTS__ variable of the caller: its options decide.
        self.environment = {
            key: value for key, value in os.environ.items() if not key.startswith("CTS__")
        }

    @property
    def broker(self) -> RabbitMQSettings:
        return RabbitMQSettings(queue_prefix=self.prefix)

    @property
    def frontend_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.frontend}/"

    # start / stop ------------------------------------------------------------------------

    def start(self) -> str:
        """start.sh; what it printed (its standard output)."""
        command = [
            "bash",
            str(PROJECT_ROOT / "start.sh"),
            "--local",
            "--adapters",
            str(len(self.adapter_names)),
            "--model-repository",
            str(self.repository),
            "--storage",
            str(self.storage),
            "--queue-prefix",
            self.prefix,
            "--frontend-port",
            str(self.ports.frontend),
            "--triton-http-port",
            str(self.ports.triton_http),
            "--triton-grpc-port",
            str(self.ports.triton_grpc),
            "--triton-metrics-port",
            str(self.ports.triton_metrics),
            "--dicom-port",
            str(free_local_ports(1)[0]),
            *self.extra_arguments,
        ]
        started = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if started.returncode != 0:
            raise RuntimeError(f"start.sh failed:\n{started.stdout}\n{started.stderr}")
        for pid_file in sorted(self.run_dir.glob("*.pid")):
            pid = int(pid_file.read_text())
            argv, environment, cwd = _read_process(pid)
            self.services[pid_file.stem] = Service(pid_file.stem, pid, argv, environment, cwd)
            self.launched_groups.add(pid)
        expected = {"triton", "frontend", "dicom-listener", *self.adapter_names}
        if set(self.services) != expected:
            raise RuntimeError(f"start.sh started {sorted(self.services)}, not {sorted(expected)}")
        return started.stdout

    def stop(self) -> subprocess.CompletedProcess[str]:
        # Thaw anything a failed test left frozen, or stop.sh would wait for it in vain.
        for service in self.services.values():
            self._signal_group(service, signal.SIGCONT)
        stopped = subprocess.run(
            ["bash", str(PROJECT_ROOT / "stop.sh"), "--storage", str(self.storage)],
            cwd=PROJECT_ROOT,
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for service in self.services.values():
            if service.child is not None:
                service.child.wait(timeout=30)  # reap what this module launched
        return stopped

    # faults ------------------------------------------------------------------------------

    def leftover_processes(self) -> list[int]:
        """Processes of any service group this stack ever had (tritonserver's stubs too)."""
        return sorted(process_groups(self.launched_groups))

    def pid(self, name: str) -> int:
        return self.services[name].pid

    def alive(self, name: str) -> bool:
        service = self.services[name]
        if service.child is not None and service.child.poll() is not None:
            return False
        return process_alive(service.pid)

    def _signal_group(self, service: Service, signum: int) -> None:
        # start.sh runs each service in its own session: the group is the service and its
        # children (tritonserver and the python backend stubs for Triton).
        with suppress(ProcessLookupError):
            os.killpg(service.pid, signum)

    def kill(self, name: str) -> None:
        """kill -9: no clean-up runs in the service; waits until it is gone."""
        service = self.services[name]
        self._signal_group(service, signal.SIGKILL)
        if service.child is not None:
            service.child.wait(timeout=30)
        wait_for(lambda: not process_groups({service.pid}), 30, f"{name} to die")

    def freeze(self, name: str) -> None:
        self._signal_group(self.services[name], signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        self._signal_group(self.services[name], signal.SIGCONT)

    @contextmanager
    def frozen(self, name: str) -> Iterator[None]:
        """The service (all its processes) stopped by SIGSTOP; always thawed on exit."""
        self.freeze(name)
        try:
            yield
        finally:
            self.thaw(name)

    def crash_triton(self) -> None:
        """kill -9 Triton (server, backend stubs, launcher) and remove what a crash leaves
        behind: the stubs' shared-memory regions and the launcher's backend folder."""
        leftovers = triton_leftovers(sorted(process_groups({self.services["triton"].pid})))
        self.kill("triton")
        remove_paths(leftovers)

    def terminate(self, name: str, timeout_s: float = 90.0) -> None:
        """SIGTERM, as stop.sh sends it; waits until the service has exited."""
        service = self.services[name]
        try:
            os.kill(service.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if service.child is not None:
            service.child.wait(timeout=timeout_s)
        wait_for(lambda: not process_alive(service.pid), timeout_s, f"{name} to exit")

    def launch(self, name: str) -> None:
        """Start a service again exactly as start.sh did; waits until it serves."""
        service = self.services[name]
        if self.alive(name):
            raise RuntimeError(f"{name} is still running")
        # As start.sh: the service's own log goes to <name>.log (CTS__LOGGING__FILE, in the
        # environment read back), whatever else it prints is appended to <name>.out.
        log = (self.log_dir / f"{name}.out").open("ab")
        try:
            child = subprocess.Popen(
                service.argv,
                cwd=service.cwd,
                env=service.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # as start.sh's setsid
            )
        finally:
            log.close()
        service.pid = child.pid
        service.child = child
        self.launched_groups.add(child.pid)
        # Reap it as soon as it exits: a zombie still answers `kill -0`, and stop.sh would
        # wait its full timeout for a service that is long gone.
        threading.Thread(target=child.wait, name=f"reap-{name}", daemon=True).start()
        (self.run_dir / f"{name}.pid").write_text(f"{child.pid}\n")
        if name == "triton":
            url = f"http://127.0.0.1:{self.ports.triton_http}/v2/health/ready"
            wait_for(lambda: self._serving(name, lambda: http_ok(url)), 180, "Triton ready")
        elif name == "frontend":
            wait_for(
                lambda: self._serving(name, lambda: http_ok(self.frontend_url + "healthz")),
                180,
                "the frontend",
            )

    def _serving(self, name: str, probe: Callable[[], bool]) -> bool:
        if not self.alive(name):
            raise AssertionError(f"{name} exited: see {self.log_dir / name}.log and .out")
        return probe()

    def heal(self) -> None:
        """Bring every service back (after a test that failed half way)."""
        for service in self.services.values():
            self._signal_group(service, signal.SIGCONT)
        if not self.alive("triton"):
            self.crash_triton()  # its stubs may have outlived it
            self.launch("triton")
        for name in (*self.adapter_names, "frontend"):
            if not self.alive(name):
                self.launch(name)


# -- the broker ------------------------------------------------------------------------------


def rabbitmq_reachable(settings: RabbitMQSettings) -> bool:
    try:
        connection = connect(settings, name="fault suite probe", give_up_after_s=0)
    except CONNECTION_ERRORS:
        return False
    connection.close()
    return True


def ensure_rabbitmq_running(settings: RabbitMQSettings, timeout_s: float = 120.0) -> None:
    """start_app if the node runs without its application, rabbitmq-server if the node is
    down; then wait until clients can connect."""
    if rabbitmq_reachable(settings):
        return
    started = subprocess.run(
        ["rabbitmqctl", "start_app"], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT_S
    )
    if started.returncode != 0:
        subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=60)
    wait_for(lambda: rabbitmq_reachable(settings), timeout_s, "RabbitMQ to accept clients", 1.0)


def rabbitmqctl(*arguments: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *arguments],
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
        check=True,
    )
    return done.stdout


@dataclass
class QueueState:
    ready: int
    unacknowledged: int
    consumers: int


def queue_state(name: str) -> QueueState | None:
    listing = rabbitmqctl(
        "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
        "messages_unacknowledged", "consumers",
    )  # fmt: skip
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] == name:
            return QueueState(int(parts[1]), int(parts[2]), int(parts[3]))
    return None


def consumers_of(settings: RabbitMQSettings, queue: str) -> int:
    connection = connect(settings, name="fault suite probe", give_up_after_s=10)
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def drain_queue(settings: RabbitMQSettings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    connection = connect(settings, name="fault suite drain", give_up_after_s=10)
    taken = []
    try:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return taken
            taken.append((properties, body))
    finally:
        connection.close()


# -- the submitting system -------------------------------------------------------------------


MODEL_REQUEST_STAGES = ("chest_check", "inference")
STUDY_FIXTURES = {
    "chest": "chest_ct_lung_dx_a0002",
    "head": "head_ct_gantry_tilt",
    # Refused at series selection: no volume, so no model request at all (a head CT asks
    # Triton's body_part_regression in its chest check).
    "mr": "mr_brain_t1",
}


def study_zips(fixtures_dir: Path, folder: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """{kind: <folder>/<kind>.zip}, the fixture study of each kind zipped as a customer sends it."""
    return {
        kind: zip_directory(fixtures_dir / STUDY_FIXTURES[kind], folder / f"{kind}.zip")
        for kind in kinds
    }


def prepared_or_checked(storage: Path, task_id: str) -> bool:
    """A preparation stage's work on the task, finished and recorded: the prepared study's
    hand-off to the model stage, or a passed check first."""
    return read_handoff(storage, task_id) is not None or read_check(storage, task_id) is not None


@dataclass
class SentStudy:
    task_id: str
    name: str  # original_filename, unique within a scenario
    kind: str  # "chest", "head", "mr", "poison"


@dataclass
class TaskClient:
    """Submits tasks and reads replies like any foreign system (plain pika, documented JSON)."""

    settings: RabbitMQSettings
    storage: Path
    reply_queue: str
    submitted_by: str = "fault-suite"
    # Each task's distinct results, in the order they came.
    results: dict[str, list[StudyResult]] = field(default_factory=dict)
    progress: list[StudyProgress] = field(default_factory=list)
    # Results an adapter sent again, byte for byte the same as one taken before
    # (services/broker/schemas.py, "At least once"): a stored result republished by the
    # adapter that took over a task whose delivered mark was not written. A reply the broker
    # redelivers because this client's ack was lost is the same message, and not counted.
    repeats: Counter[str] = field(default_factory=Counter)
    _taken: set[bytes] = field(default_factory=set)
    _connection: pika.BlockingConnection | None = None
    _channel_handle: BlockingChannel | None = None

    def _channel(self) -> BlockingChannel:
        if self._connection is None or not self._connection.is_open:
            self._connection = connect(self.settings, name="fault suite client", give_up_after_s=90)
            self._channel_handle = self._connection.channel()
            self._channel_handle.confirm_delivery()
            self._channel_handle.queue_declare(self.reply_queue, durable=True)
        assert self._channel_handle is not None
        return self._channel_handle

    def _retrying(self, action: Callable[[], object]) -> object:
        for _ in range(30):
            try:
                return action()
            except CONNECTION_ERRORS:
                self._connection = None  # the broker restarted: connect again
                time.sleep(1.0)
        raise AssertionError("the broker stayed unreachable for the test client")

    def publish(self, body: bytes, *, correlation_id: str | None, message_type: str) -> None:
        topology = QueueTopology(prefix=self.settings.queue_prefix)

        def send() -> None:
            self._channel().basic_publish(
                exchange=topology.task_exchange,
                routing_key="study",
                body=body,
                properties=pika.BasicProperties(
                    content_type="application/json",
                    type=message_type,
                    delivery_mode=pika.DeliveryMode.Persistent,
                    reply_to=self.reply_queue,
                    correlation_id=correlation_id,
                ),
                mandatory=True,
            )

        self._retrying(send)

    def submit(self, study: Path | None, name: str, kind: str, *, link: bool = False) -> SentStudy:
        """Copy the study into the shared storage (None: a task whose file is missing; with
        ``link``, a hard link: hundreds of uploads, one copy) and queue its task."""
        task_id = uuid.uuid4().hex
        relative = f"uploads/{task_id}/{name}"
        if study is not None:
            target = self.storage / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if link:
                os.link(study, target)
            else:
                shutil.copyfile(study, target)
        body = {
            "schema_version": 1,
            "task_id": task_id,
            "correlation_id": task_id,
            "study_path": relative,
            "original_filename": name,
            "reply_to": self.reply_queue,
            "submitted_by": self.submitted_by,
        }
        self.publish(json.dumps(body).encode(), correlation_id=task_id, message_type="StudyTask")
        return SentStudy(task_id, name, kind)

    def submit_unreadable(self, body: bytes, name: str) -> SentStudy:
        """A message that is not a StudyTask; its reply comes under ``task_id``."""
        task_id = uuid.uuid4().hex
        self.publish(body, correlation_id=task_id, message_type="StudyTask")
        return SentStudy(task_id, name, "poison")

    def poll(self) -> None:
        """Take every reply waiting. Acked after it is recorded: with auto-ack, a reply on its
        way when the broker restarted was gone (the chaos soak once missed one). A
        redelivered copy of a reply taken before is the same message, skipped; a result an
        adapter sent again, byte for byte, is counted in ``repeats`` (``seen`` counts it, as a
        duplicate; only the chaos soak, which counts ``distinct``, allows a few); a second
        result that differs is a duplicate."""

        def take_all() -> None:
            channel = self._channel()
            while True:
                method, properties, body = channel.basic_get(self.reply_queue)
                if method is None:
                    return
                if method.redelivered and body in self._taken:
                    channel.basic_ack(method.delivery_tag)
                    continue
                message = decode_message(body, type_name=properties.type)
                if not isinstance(message, StudyResult):
                    self.progress.append(message)
                elif body in self._taken:
                    self.repeats[message.task_id] += 1
                else:
                    self._taken.add(body)
                    self.results.setdefault(message.task_id, []).append(message)
                channel.basic_ack(method.delivery_tag)

        self._retrying(take_all)

    def wait_for_results(self, sent: list[SentStudy], timeout_s: float) -> None:
        def all_arrived() -> bool:
            self.poll()
            return all(study.task_id in self.results for study in sent)

        wait_for(all_arrived, timeout_s, "every result on the reply queue", interval_s=0.25)

    def settle(self, seconds: float = 3.0) -> None:
        """Keep reading for a while: a duplicate would come now, if at all."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            time.sleep(0.25)

    def result(self, task_id: str) -> StudyResult:
        return self.results[task_id][0]

    def seen(self) -> Counter[str]:
        """How many results of each task id reached the reply queue, a result an adapter
        sent again included (every scenario but the chaos soak expects none)."""
        return self.distinct() + self.repeats

    def distinct(self) -> Counter[str]:
        """How many distinct results of each task id reached the reply queue."""
        return Counter({task_id: len(copies) for task_id, copies in self.results.items()})

    def in_model_request(
        self, sent: list[SentStudy], count: int, timeout_s: float
    ) -> dict[str, str]:
        """{adapter id: task id} once ``count`` adapters have started a request to Triton.

        The first request to Triton is the chest check's when the repository serves a
        body-part regression model (the tests' demo repository does), else the inference's.
        """
        ours = {study.task_id for study in sent}

        def holders() -> dict[str, str] | None:
            self.poll()
            found = {
                message.adapter_id: message.task_id
                for message in self.progress
                if message.stage in MODEL_REQUEST_STAGES and message.task_id in ours
            }
            return found if len(found) >= count else None

        return wait_for(
            holders, timeout_s, f"{count} adapters inside a model request", interval_s=0.2
        )

    def results_of(self, task_id: str) -> StudyResult | None:
        """The task's first result seen, or None."""
        copies = self.results.get(task_id)
        return copies[0] if copies else None

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()


# -- counting --------------------------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    sent: int
    results: int  # tasks with at least one result where the user looks
    lost: int  # tasks without a result where the user looks, or without a stored result
    duplicated: int  # extra copies where the user looks, or extra report rows
    note: str = ""

    def cells(self) -> list[str]:
        return [
            self.scenario,
            str(self.sent),
            str(self.results),
            str(self.lost),
            str(self.duplicated),
        ]


def report_rows(storage: Path, task_id: str) -> int:
    """Rows of the task's report table (results/<task_id>/output.xlsx)."""
    xlsx = result_files_dir(storage, task_id) / "output.xlsx"
    if not xlsx.is_file():
        return 0
    sheet = openpyxl.load_workbook(xlsx, read_only=True).active
    return sum(1 for row in sheet.iter_rows(min_row=2, values_only=True) if any(row))


REGISTRY_CATCH_UP_S = 90.0  # the recorder may still be writing (or waiting for its database)


def registry_mismatches(
    registry: Registry, sent: list[SentStudy], result_of: Callable[[str], StudyResult | None]
) -> tuple[int, int]:
    """(lost, duplicated) in the study registry: each task with a result must have one final
    row per study of that result, in the state the result says, and nothing more."""
    expected = {
        study.task_id: result for study in sent if (result := result_of(study.task_id)) is not None
    }

    def final_rows() -> dict[str, list[StudyRecord]] | None:
        rows = {task_id: registry.task_studies(task_id) for task_id in expected}
        done = all(records and all(r.state.final for r in records) for records in rows.values())
        return rows if done else None

    try:
        rows = wait_for(final_rows, REGISTRY_CATCH_UP_S, "the registry's rows final", 1.0)
    except AssertionError:
        rows = {task_id: registry.task_studies(task_id) for task_id in expected}
    lost = duplicated = 0
    for task_id, result in expected.items():
        records = rows[task_id]
        want = StudyState.FAILED if result.status is TaskStatus.FAILED else StudyState.DONE
        right = [record for record in records if record.state is want]
        lost += max(len(result.reports) - len(right), 0)
        duplicated += max(len(records) - len(result.reports), 0)
    return lost, duplicated


def count_outcome(
    scenario: str,
    sent: list[SentStudy],
    seen: Counter[str],
    storage: Path,
    *,
    stored_expected: Callable[[SentStudy], bool] = lambda study: True,
    note: str = "",
    registry: Registry | None = None,
    result_of: Callable[[str], StudyResult | None] | None = None,
) -> Outcome:
    """``seen``: how many final results of each task id reached the user. With a registry,
    its rows count too (every result recorded once, in its final state)."""
    lost = duplicated = 0
    if registry is not None:
        lost, duplicated = registry_mismatches(
            registry, sent, result_of or (lambda task_id: load_result(storage, task_id))
        )
    for study in sent:
        copies = seen.get(study.task_id, 0)
        lost += copies == 0
        duplicated += max(copies - 1, 0)
        if stored_expected(study):
            stored = load_result(storage, study.task_id)
            if stored is None:
                lost += copies > 0  # a result the user saw must be in storage too
            elif stored.reports and stored.files:
                # One row per study in the task's own report table (single-study zips).
                duplicated += max(report_rows(storage, study.task_id) - len(stored.reports), 0)
    unexpected = set(seen) - {study.task_id for study in sent}
    duplicated += sum(seen[task_id] for task_id in unexpected)
    results = sum(1 for study in sent if seen.get(study.task_id, 0) > 0)
    return Outcome(scenario, len(sent), results, lost, duplicated, note)


def assert_screened(client: TaskClient, sent: list[SentStudy]) -> None:
    """Chests are Success rows, heads are Failure rows 'not a chest CT', MR studies 'no CT
    series' (not an outage); a poison task only needs its result."""
    for study in sent:
        result = client.result(study.task_id)
        if study.kind == "poison":
            continue
        assert result.status is TaskStatus.COMPLETED, (study.name, result.error)
        report = result.reports[0]
        why = (study.name, report.failure_reason)
        if study.kind == "chest":
            assert report.processing_status is ProcessingStatus.SUCCESS, why
        else:
            assert report.processing_status is ProcessingStatus.FAILURE, why
            expected = "no CT series" if study.kind == "mr" else "not a chest CT"
            assert expected in (report.failure_reason or ""), why


def record_outcome(outcome: Outcome, outcomes: list[Outcome]) -> None:
    """The scenario's row in the table; nothing lost, nothing duplicated."""
    outcomes.append(outcome)
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome
    assert outcome.results == outcome.sent


def replies_tally(
    client: TaskClient, registry: Registry, outcomes: list[Outcome]
) -> Callable[..., Outcome]:
    """``tally(scenario, sent, note=..., stored_expected=...)``: the scenario counted from the
    replies ``client`` read, its storage and the registry, and recorded (:func:`record_outcome`)."""

    def tally(scenario: str, sent: list[SentStudy], **options: Any) -> Outcome:
        outcome = count_outcome(
            scenario,
            sent,
            client.seen(),
            client.storage,
            registry=registry,
            result_of=client.results_of,
            **options,
        )
        record_outcome(outcome, outcomes)
        return outcome

    return tally


def format_table(outcomes: list[Outcome]) -> str:
    header = ["scenario", "studies sent", "results", "lost", "duplicated"]
    rows = [header, *(outcome.cells() for outcome in outcomes)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("-+-".join("-" * width for width in widths))
    notes = [f"  {outcome.scenario}: {outcome.note}" for outcome in outcomes if outcome.note]
    return "\n".join(lines + (["notes:", *notes] if notes else []))


class TablePrinter:
    """Prints a scenario table in pytest's terminal summary (with -q too)."""

    def __init__(self, title: str, outcomes: list[Outcome], measurements: list[str]) -> None:
        self.title = title
        self.outcomes = outcomes
        self.measurements = measurements  # lines printed under the table

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.outcomes and not self.measurements:
            return
        terminalreporter.write_sep("=", self.title)
        for line in [*format_table(self.outcomes).splitlines(), *self.measurements]:
            terminalreporter.write_line(line)


def outcome_table(
    request: pytest.FixtureRequest, title: str, measurements: list[str] | None = None
) -> Iterator[list[Outcome]]:
    """A module fixture's body: the scenarios' rows, printed as a table (with
    ``measurements`` under it) in the terminal summary and in the captured output."""
    rows: list[Outcome] = []
    lines = measurements if measurements is not None else []
    request.config.pluginmanager.register(TablePrinter(title, rows, lines), f"table-{id(rows)}")
    yield rows
    print("\n" + "\n".join([format_table(rows), *lines]))  # also with -s, -rA


@contextmanager
def rabbitmq_restarted(settings: RabbitMQSettings) -> Iterator[Callable[[], None]]:
    """``rabbitmqctl stop_app``; the body runs while the broker is down and may call the
    yielded function to start it again early; it is started on exit whatever happened."""
    rabbitmqctl("stop_app")
    state = {"up": False}

    def start_again() -> None:
        if not state["up"]:
            rabbitmqctl("start_app")
            state["up"] = True
        ensure_rabbitmq_running(settings)

    try:
        yield start_again
    finally:
        try:
            start_again()
        finally:
            ensure_rabbitmq_running(settings)


def postgres_cluster() -> str:
    """The version of the machine's PostgreSQL cluster (Debian's layout)."""
    return sorted(
        Path("/etc/postgresql").iterdir(), key=lambda p: [int(x) for x in p.name.split(".")]
    )[-1].name


@contextmanager
def postgres_restarted() -> Iterator[Callable[[], None]]:
    """The machine's PostgreSQL stopped (fast: clients are cut off); the body runs while it is
    down and may start it again early through the yielded function; started on exit."""
    version = postgres_cluster()
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
    subprocess.run([*command, "stop", "-m", "fast"], check=True, capture_output=True, timeout=60)
    state = {"up": False}

    def start_again() -> None:
        if not state["up"]:
            subprocess.run([*command, "start"], check=True, capture_output=True, timeout=60)
            state["up"] = True

    try:
        yield start_again
    finally:
        start_again()

"""The stack spread over several hosts (tests/netns_support.py) for the multi-host and chaos
tests. Not a test module.

Layout: the broker host runs its own RabbitMQ node and the frontend; a Triton host runs the
nvidia-pytriton Triton (tiny demo repository) bound to its own address; each adapter has a
host of its own and reaches Triton over gRPC (no shared memory across hosts); the database
host runs a PostgreSQL cluster of its own, the study registry (``registry.url``; the services
get its password from ``PGPASSWORD``), upgraded before the services start. More frontends
can be added, each on a host of its own (:meth:`Cluster.add_frontend`), all recording what
the adapters report (competing consumers of the registry queue). Storage is one folder every
host sees. The services read one config file (``CTS_CONFIG``): replacing the Triton host
means writing its new address there and restarting the adapters, as an operator would.

Services are launched as ``python -m ...`` inside their host's namespace, each in its own
session (a process group the cluster can kill, freeze or thaw). A supervisor restarts Triton
when it exits on its own, as compose's ``restart: unless-stopped`` or a Deployment would:
the wheel's Triton (python backend) has been seen to abort after a SIGSTOP/SIGCONT
(``boost::interprocess::lock_exception`` between the server and its backend stub).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import yaml
from fault_support import (
    consumers_of,
    http_ok,
    process_groups,
    remove_paths,
    triton_leftovers,
)
from netns_support import (
    BrokerNode,
    Host,
    Network,
    PostgresNode,
    netns_unavailable,
    postgres_unavailable,
    start_logged,
    sweep_stale_databases,
    sweep_stale_networks,
)
from preconditions import require
from prometheus_client.parser import text_string_to_metric_families
from stack_support import PROJECT_ROOT, wait_for

from services.broker.schemas import MODEL_STAGE, QueueTopology
from services.core.config import RabbitMQSettings, load_settings
from services.registry import Registry, upgrade_registry

BROKER_USER = "cts-cluster"
BROKER_PASSWORD = "cluster-test-secret"
DATABASE_NAME = DATABASE_USER = "cts"
DATABASE_PASSWORD = "registry-test-secret"
# Short heartbeats: a host cut off from the broker is noticed in seconds, not minutes.
HEARTBEAT_S = 5
# A request to a host that vanished waits this long before it is retried.
TRITON_TIMEOUT_S = 20.0
ADAPTER_METRICS_PORT = 9410
TRITON_HTTP_PORT, TRITON_GRPC_PORT = 8000, 8001
FRONTEND_PORT = 7860
SUPERVISOR_INTERVAL_S = 2.0
FRONTEND = "frontend"  # the first frontend, on the broker host


@dataclass
class Service:
    name: str
    host: Host
    argv: list[str]
    environment: dict[str, str]
    process: subprocess.Popen[bytes] | None = None


class Cluster:
    def __init__(self, *, repository: Path, workdir: Path, adapters: int, prefix: str) -> None:
        sweep_stale_networks()
        sweep_stale_databases()
        self.repository = repository
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.config_file = workdir / "config.yaml"
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.topology = QueueTopology(prefix=prefix)
        self.network = Network()
        self.broker_host = self.network.add_host("broker")
        self.triton_host = self.network.add_host("triton-a")
        self.adapter_names = [f"adapter-{index}" for index in range(1, adapters + 1)]
        self.hosts = {name: self.network.add_host(name) for name in self.adapter_names}
        self.db_host = self.network.add_host("db")
        self.frontend_hosts: dict[str, Host] = {FRONTEND: self.broker_host}
        self.broker = BrokerNode(
            self.broker_host, workdir / "rabbitmq", username=BROKER_USER, password=BROKER_PASSWORD
        )
        self.rabbitmq = RabbitMQSettings(
            host=self.broker_host.address,
            username=BROKER_USER,
            password=BROKER_PASSWORD,
            queue_prefix=prefix,
            heartbeat_s=HEARTBEAT_S,
        )
        self.database = PostgresNode(
            self.db_host,
            self.network.subnet,
            self.log_dir / "postgres.log",
            database=DATABASE_NAME,
            user=DATABASE_USER,
            password=DATABASE_PASSWORD,
        )
        self.services: dict[str, Service] = {}
        self.adapter_pids: set[int] = set()  # every adapter process ever launched
        self.triton_name = "triton"
        self.triton_restarts: list[str] = []  # when the supervisor restarted a crashed Triton
        self._triton_lock = threading.RLock()  # the supervisor vs. replacing the host
        self._supervisor_stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)

    # -- configuration ---------------------------------------------------------------------

    @property
    def triton_url(self) -> str:
        return f"{self.triton_host.address}:{TRITON_GRPC_PORT}"

    @property
    def registry_url(self) -> str:
        """The registry's URL with its password (the test's own connections)."""
        return self.database.url(password=True).render_as_string(hide_password=False)

    def open_registry(self) -> Registry:
        return Registry(self.database.url(password=True))

    def write_config(self) -> None:
        """The services' config file: the broker, the storage, Triton, the registry (its
        password is not in the file: PGPASSWORD)."""
        config = {
            "rabbitmq": {
                "host": self.rabbitmq.host,
                "username": BROKER_USER,
                "password": BROKER_PASSWORD,
                "queue_prefix": self.prefix,
                "heartbeat_s": HEARTBEAT_S,
            },
            "storage": {"root": str(self.storage)},
            "registry": {"url": self.database.url().render_as_string(hide_password=False)},
            "inference": {
                "backend": "triton",
                "model_repository": str(self.repository),
                "triton_url": self.triton_url,
                "triton_transport": "grpc",
                "triton_timeout_s": TRITON_TIMEOUT_S,
            },
        }
        self.config_file.write_text(yaml.safe_dump(config))

    def _environment(self, host: Host, extra: dict[str, str]) -> dict[str, str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CTS__")}
        environment.update(
            {
                "CTS_CONFIG": str(self.config_file),
                "CTS__METRICS__HOST": host.address,
                "PGPASSWORD": DATABASE_PASSWORD,
                "ORT_DISABLE_TELEMETRY": "1",
                **extra,
            }
        )
        return environment

    # -- processes ---------------------------------------------------------------------------

    def launch(self, name: str, host: Host, argv: list[str], extra: dict[str, str]) -> Service:
        service = Service(name, host, argv, self._environment(host, extra))
        self.services[name] = service
        self._start(service)
        return service

    def _start(self, service: Service) -> None:
        service.process = start_logged(
            service.host.command(service.argv),
            self.log_dir / f"{service.name}.log",
            cwd=PROJECT_ROOT,
            env=service.environment,
        )
        if service.name.startswith("adapter"):
            # ip netns exec replaces itself with the program: the pid is the adapter's.
            self.adapter_pids.add(service.process.pid)
        process = service.process
        threading.Thread(target=process.wait, name=f"reap-{service.name}", daemon=True).start()

    def relaunch(self, name: str) -> None:
        service = self.services[name]
        if self.alive(name):
            raise RuntimeError(f"{name} is still running")
        self._start(service)

    def alive(self, name: str) -> bool:
        process = self.services[name].process
        return process is not None and process.poll() is None

    def pid(self, name: str) -> int:
        process = self.services[name].process
        assert process is not None
        return process.pid

    def signal(self, name: str, signum: int) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.pid(name), signum)

    def kill(self, name: str) -> None:
        """kill -9 the service's process group; waits until it is gone."""
        pid = self.pid(name)
        self.signal(name, signal.SIGKILL)
        wait_for(lambda: not process_groups({pid}), 30, f"{name} to die")

    def terminate(self, name: str, timeout_s: float = 120.0) -> None:
        """SIGTERM (a clean stop: an adapter finishes or gives back its study)."""
        if not self.alive(name):
            return
        self.signal(name, signal.SIGCONT)
        with suppress(ProcessLookupError):
            os.kill(self.pid(name), signal.SIGTERM)
        process = self.services[name].process
        assert process is not None
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(name)

    @contextmanager
    def frozen(self, name: str) -> Iterator[None]:
        """Every process of the service stopped (SIGSTOP); always thawed on exit."""
        self.signal(name, signal.SIGSTOP)
        try:
            yield
        finally:
            self.signal(name, signal.SIGCONT)

    # -- the services ---------------------------------------------------------------------

    def launch_triton(self) -> None:
        host = self.triton_host
        self.launch(
            self.triton_name,
            host,
            [
                sys.executable,
                "-m",
                "services.triton.local_server",
                "--model-repository",
                str(self.repository),
                "--host",
                host.address,
                "--http-port",
                str(TRITON_HTTP_PORT),
                "--grpc-port",
                str(TRITON_GRPC_PORT),
            ],
            {},
        )
        url = f"http://{host.address}:{TRITON_HTTP_PORT}/v2/health/ready"
        wait_for(lambda: self._serving(self.triton_name, url), 180, "Triton ready", 0.5)

    def _serving(self, name: str, url: str) -> bool:
        if not self.alive(name):
            raise AssertionError(f"{name} exited: see {self.log_dir / (name + '.log')}")
        return http_ok(url)

    def launch_adapter(self, name: str) -> None:
        self.launch(
            name,
            self.hosts[name],
            [
                sys.executable,
                "-m",
                "services.adapter",
                "--adapter-id",
                name,
                "--health-file",
                str(self.workdir / f"{name}.alive"),
            ],
            {"CTS__METRICS__ADAPTER_PORT": str(ADAPTER_METRICS_PORT)},
        )

    def launch_frontend(self, name: str = FRONTEND) -> None:
        host = self.frontend_hosts[name]
        self.launch(
            name,
            host,
            [sys.executable, "-m", "services.frontend"],
            {"CTS__FRONTEND__HOST": host.address, "CTS__FRONTEND__PORT": str(FRONTEND_PORT)},
        )
        self.wait_for_frontend(name)

    def wait_for_frontend(self, name: str = FRONTEND) -> None:
        url = self.frontend_url_of(name) + "healthz"  # the page itself asks for sign-in
        wait_for(lambda: self._serving(name, url), 180, f"{name} serving", 0.5)

    def add_frontend(self, name: str) -> None:
        """One more frontend, on a host of its own, with the same config file (the same
        broker, storage and registry)."""
        self.frontend_hosts[name] = self.network.add_host(name)
        self.launch_frontend(name)

    @property
    def frontend_names(self) -> list[str]:
        return list(self.frontend_hosts)

    def frontend_url_of(self, name: str) -> str:
        return f"http://{self.frontend_hosts[name].address}:{FRONTEND_PORT}/"

    @property
    def frontend_url(self) -> str:
        return self.frontend_url_of(FRONTEND)

    def _supervise(self) -> None:
        while not self._supervisor_stop.wait(SUPERVISOR_INTERVAL_S):
            with self._triton_lock:
                if not self._supervisor_stop.is_set() and not self.alive(self.triton_name):
                    self._restart_crashed_triton()

    def _restart_crashed_triton(self) -> None:
        self.triton_restarts.append(time.strftime("%H:%M:%S"))
        leftovers = triton_leftovers(self.triton_host.pids())
        self.triton_host.kill_all()  # its backend stubs, if they outlived it
        remove_paths(leftovers)
        self.relaunch(self.triton_name)
        url = f"http://{self.triton_host.address}:{TRITON_HTTP_PORT}/v2/health/ready"
        wait_for(lambda: self._serving(self.triton_name, url), 180, "Triton back", 0.5)

    def start(self) -> None:
        self.database.init()
        self.broker.start()
        self.write_config()
        # As start.sh does, with the password as an operator's environment would give it.
        environ = {"CTS__REGISTRY__URL": self.registry_url}
        upgrade_registry(load_settings(self.config_file, environ=environ))
        self.launch_triton()
        self._supervisor.start()
        for name in self.adapter_names:
            self.launch_adapter(name)
        self.launch_frontend()
        self.wait_for_adapters()

    def wait_for_adapters(self, timeout_s: float = 180.0) -> None:
        count = len(self.adapter_names)
        wait_for(
            lambda: consumers_of(self.rabbitmq, self.topology.presence_queue(MODEL_STAGE)) == count,
            timeout_s,
            f"{count} adapters consuming",
            interval_s=0.5,
        )

    # -- whole-host faults --------------------------------------------------------------------

    def replace_triton(self) -> tuple[str, str]:
        """The Triton host is lost; a new one at a new address is put in the config file and
        the adapters are restarted (SIGTERM, one after the other) to read it. The old and the
        new address."""
        with self._triton_lock:
            old = self.triton_host
            leftovers = triton_leftovers(old.pids())
            self.network.remove_host(old)  # the host is gone, with whatever it ran
            remove_paths(leftovers)
            self.triton_host = self.network.add_host("triton-b")
            self.launch_triton()
        self.write_config()
        for name in self.adapter_names:
            self.terminate(name)
            self.relaunch(name)
        return old.address, self.triton_host.address

    def crash_broker_host(self) -> None:
        """Every process of the broker host killed (RabbitMQ, epmd, the frontend)."""
        self.broker_host.kill_all()
        self.broker.reap()

    def boot_broker_host(self) -> None:
        """The broker host comes back: RabbitMQ on its old data, then the frontend."""
        self.broker.start()
        wait_for(lambda: not self.alive(FRONTEND), 30, "the old frontend reaped")
        self.relaunch(FRONTEND)
        self.wait_for_frontend()

    def restart_database(self, *, crash: bool) -> None:
        """The database host's PostgreSQL stopped fast (clients cut off) and started, or
        killed (-9, every process of the host) and started (crash recovery)."""
        self.database.restart(crash=crash)

    # -- what the hosts say -----------------------------------------------------------------

    def adapter_metrics(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The adapter's /metrics, scraped over its host's address: {(sample, labels): value}."""
        url = f"http://{self.hosts[name].address}:{ADAPTER_METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self) -> None:
        self._supervisor_stop.set()
        with self._triton_lock:
            pass  # a restart in progress finishes first
        try:
            try:
                for name in (*self.adapter_names, *self.frontend_names, self.triton_name):
                    if name in self.services:
                        self.terminate(name)
                self.broker.stop()
            finally:
                self.database.stop()  # its data folder is outside the test's folder
        finally:
            self.network.close()


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def started_cluster(
    workdir: Path, repository: Path, *, adapters: int, name: str
) -> Iterator[Cluster]:
    """A module fixture's body: the cluster on ``workdir`` serving ``repository``, with a
    queue prefix of its own (``test-<name>-...``), started, and stopped after the module.
    Where this machine cannot host one, the test skips (fails in CI, see preconditions)."""
    require(netns_unavailable())  # root and iproute2; CI has both
    require(postgres_unavailable())  # the database host's PostgreSQL; CI has it
    hosts = Cluster(
        repository=repository,
        workdir=workdir,
        adapters=adapters,
        prefix=f"test-{name}-{uuid.uuid4().hex[:8]}",
    )
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()

"""Several "hosts" on one machine for the multi-host and chaos tests. Not a test module.

Each :class:`Host` is a network namespace with its own address on a bridge (a veth pair per
host, the bridge in the root namespace); the test process itself is one more host, at the
bridge's address, like the hospital's submitting system. The namespaces have no default
route: nothing they send leaves the bridge. The file system and the process ids are shared
by all hosts (storage shared through the file system, as NFS would be).

Faults: :meth:`Host.cut` takes the host's link down (it is cut off from every host),
:meth:`Host.block` drops what it sends to one peer (a blackhole route: established
connections hang, new ones fail at once), :meth:`Host.kill_all` is a host crash.

:class:`BrokerNode` is a RabbitMQ node of its own on a host (its own node name, data folder,
Erlang cookie and epmd), so restarting "the broker host" never touches the system RabbitMQ
other tests and developers share. :class:`PostgresNode` is likewise a PostgreSQL cluster of
its own on a host (initdb, then ``postgres`` run as the postgres user, listening on that
host's address only), never the machine's PostgreSQL.

Everything needs root (CI runs as root); :func:`netns_unavailable` says why not otherwise.
Names carry the test process id: :func:`sweep_stale_networks` removes what a killed run left.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL
from stack_support import wait_for

SUBNET_FIRST_OCTETS = "10.231"  # /24 subnets 10.231.N.0 only ever exist on this bridge
NAMESPACE_PREFIX = "ctsn"
BRIDGE_PREFIX = "ctsb"
_networks = itertools.count(1)


def _ip(*arguments: str, namespace: str | None = None, check: bool = True) -> str:
    command = ["ip", *arguments]
    if namespace is not None:
        command = ["ip", "netns", "exec", namespace, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def netns_unavailable() -> str | None:
    """Why this machine cannot run the namespace tests, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is missing"
    probe = f"{NAMESPACE_PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as error:
        return f"ip netns add failed: {error}"
    _ip("netns", "del", probe, check=False)
    return None


def start_logged(
    command: list[str], log: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``command`` in a session of its own (a process group that can be killed, frozen or
    thawed as one), reading nothing, its output appended to ``log``."""
    with log.open("ab") as output:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def port_open(address: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the end on the bridge, in the root namespace

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        """Pull the host's cable: it reaches no other host and none reaches it."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")

    def block(self, peer: Host) -> None:
        """Drop everything this host sends to ``peer`` (the peer's packets still arrive)."""
        _ip("route", "add", "blackhole", f"{peer.address}/32", namespace=self.namespace)

    def unblock(self, peer: Host) -> None:
        _ip("route", "del", "blackhole", f"{peer.address}/32", namespace=self.namespace)

    def pids(self) -> list[int]:
        listing = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True, timeout=30
        ).stdout
        return [int(pid) for pid in listing.split()]

    def kill_all(self, timeout_s: float = 30.0) -> None:
        """Every process of the host, kill -9 (a crash of the host)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.pids(), timeout_s, f"the processes of {self.name} to die")


@dataclass
class Network:
    """A bridge and the hosts on it; the root namespace is the bridge's address (.1)."""

    tag: str = field(default_factory=lambda: f"{os.getpid()}{next(_networks)}")
    hosts: list[Host] = field(default_factory=list)
    _indexes: itertools.count = field(default_factory=lambda: itertools.count(10))

    def __post_init__(self) -> None:
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"[:15]
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def _free_subnet() -> str:
        routes = _ip("route", "show")
        for third in range((os.getpid() % 200) + 20, 255):
            subnet = f"{SUBNET_FIRST_OCTETS}.{third}"
            if f"{subnet}.0/24" not in routes:
                return subnet
        raise RuntimeError("no free 10.231.N.0/24 subnet")

    def add_host(self, name: str) -> Host:
        index = next(self._indexes)
        namespace = f"{NAMESPACE_PREFIX}{self.tag}-{name}"
        veth, peer = f"cv{self.tag}-{index}"[:15], f"cp{self.tag}-{index}"[:15]
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", namespace)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        _ip("link", "set", peer, "name", "eth0", namespace=namespace)
        address = f"{self.subnet}.{index}"
        _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
        _ip("link", "set", "eth0", "up", namespace=namespace)
        _ip("link", "set", "lo", "up", namespace=namespace)
        host = Host(name, namespace, address, veth)
        self.hosts.append(host)
        return host

    def remove_host(self, host: Host) -> None:
        """The host is gone: its processes killed, its namespace and link deleted."""
        host.kill_all()
        _ip("netns", "del", host.namespace, check=False)  # deletes its end of the veth pair
        _ip("link", "del", host.veth, check=False)
        self.hosts.remove(host)

    def close(self) -> None:
        for host in list(self.hosts):
            self.remove_host(host)
        _ip("link", "del", self.bridge, check=False)


def sweep_stale_networks() -> None:
    """Namespaces and bridges of test runs whose process is gone (a killed run)."""

    def dead(pid_and_counter: str) -> bool:
        # The tag is the pid followed by one or more counter digits: dead if no prefix of
        # it is a running process of ours (a pytest).
        for cut in range(len(pid_and_counter) - 1, 0, -1):
            if Path(f"/proc/{pid_and_counter[:cut]}").exists():
                return False
        return True

    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        found = re.match(rf"{NAMESPACE_PREFIX}(\d+)-", name)
        if found and dead(found.group(1)):
            host = Host(name, name, "", "")
            host.kill_all()
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge").splitlines():
        found = re.search(rf": ({BRIDGE_PREFIX}(\d+))[:@]", line)
        if found and dead(found.group(2)):
            _ip("link", "del", found.group(1), check=False)


# -- a RabbitMQ node of its own ----------------------------------------------------------------

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
AMQP_PORT = 5672


class BrokerNode:
    """``rabbitmq-server`` on ``host`` with its data under ``base``; a restart keeps the data
    (durable queues, persistent messages), as a broker host's disk does."""

    def __init__(self, host: Host, base: Path, *, username: str, password: str) -> None:
        self.host = host
        self.base = base
        self.node = f"cts{os.getpid()}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {AMQP_PORT}\n"
            f"default_user = {username}\n"
            f"default_pass = {password}\n"
            "log.file.level = info\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not the system node's /etc/rabbitmq one
        self.environment = {
            **os.environ,
            "HOME": str(base),  # the node's own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout_s: float = 120.0) -> None:
        self.process = start_logged(
            self.host.command([str(RABBITMQ_BIN / "rabbitmq-server")]),
            self.base / "server.log",
            env=self.environment,
        )
        wait_for(
            lambda: self._running() and port_open(self.host.address, AMQP_PORT),
            timeout_s,
            f"RabbitMQ on {self.host.name} to accept connections",
            interval_s=0.5,
        )

    def _running(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited: see {self.base / 'server.log'}")
        return True

    def rabbitmqctl(self, *arguments: str) -> str:
        done = subprocess.run(
            self.host.command([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *arguments]),
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout

    def queues(self) -> dict[str, tuple[int, int, int]]:
        """{queue: (ready, unacknowledged, consumers)}"""
        listing = self.rabbitmqctl(
            "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
            "messages_unacknowledged", "consumers",
        )  # fmt: skip
        found = {}
        for line in listing.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                found[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return found

    def stop(self) -> None:
        """A clean shutdown (rabbitmqctl stop), then the host's leftovers (epmd)."""
        if self.process is not None and self.process.poll() is None:
            subprocess.run(
                self.host.command([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, "stop"]),
                env=self.environment,
                capture_output=True,
                timeout=120,
            )
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.reap()

    def reap(self) -> None:
        """After a crash of the host: collect the server process."""
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            self.process = None
        # Give the port a moment: a restart right after a crash must be able to bind it.
        time.sleep(0.2)


# -- a PostgreSQL cluster of its own -----------------------------------------------------------

POSTGRES_LIB = Path("/usr/lib/postgresql")  # Debian's layout: <version>/bin/initdb ...
POSTGRES_PORT = 5432
POSTGRES_OS_USER = "postgres"  # initdb refuses root
POSTGRES_SUPERUSER = "postgres"
POSTGRES_DATA_PREFIX = "cts-test-pg"


def postgres_data_parent() -> Path:
    """Where a node's data folder goes: the postgres user's home (/var/lib/postgresql), since
    that user cannot enter root's temp folders (pytest's are 0700, and /tmp may be too). The
    folder is named after the test process, so a killed run's folder can be swept."""
    return Path(pwd.getpwnam(POSTGRES_OS_USER).pw_dir)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's programs, or None."""
    versions = [path.parent for path in POSTGRES_LIB.glob("*/bin/postgres")]
    numbered = [path for path in versions if path.parent.name.isdigit()]
    return max(numbered, key=lambda path: int(path.parent.name), default=None)


def postgres_unavailable() -> str | None:
    """Why this machine cannot run a private PostgreSQL cluster, or None when it can."""
    if postgres_bin() is None:
        return f"PostgreSQL's programs are missing (no {POSTGRES_LIB}/<version>/bin/postgres)"
    if shutil.which("setpriv") is None:
        return "util-linux's setpriv is missing"
    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        return f"there is no {POSTGRES_OS_USER} user (the PostgreSQL server package makes it)"
    return None


class PostgresNode:
    """A PostgreSQL cluster of its own on ``host``: ``initdb``, then ``postgres`` as the
    postgres user, listening on the host's address (port 5432) only, no Unix socket; one
    database owned by one role, password authentication (scram) from the hosts' subnet. A
    restart keeps the data, as a database host's disk does; :meth:`stop` removes it."""

    def __init__(
        self, host: Host, subnet: str, log: Path, *, database: str, user: str, password: str
    ) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError(postgres_unavailable() or "no PostgreSQL")
        self.bin = bin_dir
        self.host = host
        self.subnet = subnet
        self.log = log
        self.database = database
        self.user = user
        self.password = password
        self.base = Path(
            tempfile.mkdtemp(
                prefix=f"{POSTGRES_DATA_PREFIX}{os.getpid()}-", dir=postgres_data_parent()
            )
        )
        self.data = self.base / "data"
        self.process: subprocess.Popen[bytes] | None = None
        self.postmasters: list[int] = []  # every postmaster this node ran (leftover checks)

    def url(self, *, password: bool = False) -> URL:
        """The database's URL; the password only where asked (a config file goes without:
        the services get it from PGPASSWORD)."""
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password if password else None,
            host=self.host.address,
            port=POSTGRES_PORT,
            database=self.database,
        )

    def _superuser(self) -> str:
        return (
            f"host={self.host.address} port={POSTGRES_PORT} user={POSTGRES_SUPERUSER} "
            f"password={self.password} dbname=postgres connect_timeout=3"
        )

    def _as_postgres(self, argv: list[str]) -> list[str]:
        return [
            "setpriv",
            f"--reuid={POSTGRES_OS_USER}",
            f"--regid={POSTGRES_OS_USER}",
            "--init-groups",
            "--",
            *argv,
        ]

    def init(self) -> None:
        """initdb (the superuser with the node's password), then the database and its owner."""
        shutil.chown(self.base, POSTGRES_OS_USER, POSTGRES_OS_USER)
        password_file = self.base / "password"
        password_file.write_text(self.password + "\n")
        shutil.chown(password_file, POSTGRES_OS_USER, POSTGRES_OS_USER)
        command = [
            str(self.bin / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            POSTGRES_SUPERUSER,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a test's cluster: its files need not reach the disk now
        ]
        try:
            subprocess.run(
                self._as_postgres(command),
                cwd=self.base,
                capture_output=True,
                timeout=120,
                check=True,
            )
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"initdb failed: {error.stderr.decode()[-2000:]}") from error
        finally:
            password_file.unlink(missing_ok=True)
        # Only the hosts of this network, with a password; no local connections at all.
        (self.data / "pg_hba.conf").write_text(f"host all all {self.subnet}.0/24 scram-sha-256\n")
        self.start()
        with psycopg.connect(self._superuser(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.user)
                )
            )

    def start(self, timeout_s: float = 120.0) -> None:
        """``postgres`` on the host (after a crash it recovers from its WAL first); waits
        until it accepts connections."""
        settings = {
            "listen_addresses": self.host.address,
            "port": str(POSTGRES_PORT),
            "unix_socket_directories": "",  # the machine's PostgreSQL owns the usual one
            "dynamic_shared_memory_type": "mmap",  # in the data folder, removed with it
        }
        options = [part for key, value in settings.items() for part in ("-c", f"{key}={value}")]
        # ip netns exec, then setpriv: each replaces itself, the pid is the postmaster's.
        self.process = start_logged(
            self.host.command(
                self._as_postgres([str(self.bin / "postgres"), "-D", str(self.data), *options])
            ),
            self.log,
            cwd=self.base,
        )
        self.postmasters.append(self.process.pid)
        wait_for(
            self._accepting,
            timeout_s,
            f"PostgreSQL on {self.host.name} to accept connections",
            interval_s=0.3,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _accepting(self) -> bool:
        if not self.running():
            raise AssertionError(f"postgres exited: see {self.log}")
        try:
            psycopg.connect(self._superuser()).close()
        except psycopg.OperationalError:
            return False  # not listening yet, or still recovering
        return True

    def stop_fast(self, timeout_s: float = 60.0) -> None:
        """``pg_ctl stop -m fast``'s signal (SIGINT): clients cut off, a clean shutdown."""
        if self.process is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.host.kill_all()
        self._reap()

    def crash(self) -> None:
        """Every process of the database host killed (-9): the postmaster and its backends."""
        self.host.kill_all()
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=30)
            self.process = None
        # The backends outlive the postmaster briefly; a new one refuses to start beside them.
        wait_for(lambda: not self.host.pids(), 30, f"the processes of {self.host.name} gone")

    def ensure_running(self) -> None:
        """Started again when it is not running (whatever is left of it killed first)."""
        if not self.running():
            self.crash()
            self.start()

    def restart(self, *, crash: bool) -> None:
        """Fast stop and start, or kill -9 and start (crash recovery)."""
        if crash:
            self.crash()
        else:
            self.stop_fast()
        self.start()

    def stop(self) -> None:
        """A clean shutdown, then the data folder removed. A crashed node is started once
        more first: its recovery removes the shared memory the crash left behind."""
        try:
            if not self.running() and (self.data / "postmaster.pid").exists():
                self.start()
            self.stop_fast()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


def sweep_stale_databases() -> None:
    """Data folders of test runs whose process is gone (a killed run); run after
    :func:`sweep_stale_networks`, which killed their servers with their namespaces."""
    if postgres_unavailable() is not None:
        return
    for folder in postgres_data_parent().glob(f"{POSTGRES_DATA_PREFIX}*-*"):
        found = re.fullmatch(rf"{POSTGRES_DATA_PREFIX}(\d+)-.*", folder.name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            shutil.rmtree(folder, ignore_errors=True)

"""Run the Triton Inference Server shipped in the ``nvidia-pytriton`` wheel, locally.

The wheel carries a real ``tritonserver`` binary with only the python backend. To
serve the python-flavour model repository it needs three things that pytriton
itself arranges before it starts the server, and this launcher arranges the same way:

* ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` (the bundled shared
  libraries of the server and the backend stub);
* a backend directory whose ``python/`` folder holds the backend library, its
  ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for
  the interpreter's version; the wheel keeps the stubs apart (one per Python
  version), so a temporary directory of symlinks is made for each server;
* ``PATH`` starting with the Python environment's ``bin``: the stub embeds the
  system ``libpython`` and finds its ``sys.prefix`` by looking up ``python3`` on
  ``PATH``; with the venv's interpreter first it reads the venv's ``pyvenv.cfg`` and
  so imports the venv's numpy (< 2) and onnxruntime. No ``PYTHONPATH`` is needed.
  The venv must be built from the same system Python the stub links against
  (``/usr/bin/python3.11`` here).

HTTP, gRPC and metrics bind to 127.0.0.1 unless told otherwise.

Use it as a context manager (tests)::

    with LocalTritonServer(repository, http_port=..., grpc_port=..., metrics_port=...) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

or in the foreground until SIGTERM/SIGINT (start.sh)::

    python -m services.triton.local_server --model-repository model_repository_running
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from loguru import logger

from services.triton.distribution import (
    TritonServerError,
    find_distribution,
    make_backend_directory,
    server_arguments,
    server_environment,
)

__all__ = ["LocalTritonServer", "TritonServerError", "free_local_ports"]

LOOPBACK = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_READY_TIMEOUT_S = 600.0  # the full demo encoder loads and warms up on CPU for minutes
LOG_TAIL_CHARS = 4000
# The python backend's shared memory with each model's stub process (Triton names it).
PYTHON_BACKEND_REGION = "/dev/shm/triton_python_backend_shm_region_"
# Triton's glog prefix of an error line, e.g. "E1122 11:09:10.829857 12115 file.cc:692]"
ERROR_LINE = re.compile(r"^E\d{4} ")


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):  # state, then the parent's pid
            children.append(int(stat.parent.name))
    return children


def python_backend_regions(pid: int) -> set[Path]:
    """The python backend's shared-memory regions (``/dev/shm/<prefix><uuid>``) that process
    ``pid`` or its children (the model stubs) map, from /proc (none where it cannot be
    read)."""
    regions = set()
    for process in (pid, *_children(pid)):
        try:
            maps = Path(f"/proc/{process}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset device inode path
            path = fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""
            if path.startswith(PYTHON_BACKEND_REGION):
                regions.add(Path(path))
    return regions


class LocalTritonServer:
    """One tritonserver process serving a model repository on local ports."""

    def __init__(
        self,
        model_repository: Path,
        *,
        host: str = LOOPBACK,
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        log_file: Path | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        python_prefix: Path | None = None,
        log_verbose: int = 0,
        extra_arguments: list[str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_file = Path(log_file) if log_file is not None else None
        self.ready_timeout_s = ready_timeout_s
        # The environment whose packages the models import: the one running this code.
        self.python_prefix = Path(python_prefix) if python_prefix is not None else Path(sys.prefix)
        self.log_verbose = log_verbose
        self.extra_arguments = list(extra_arguments or [])
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_handle: IO[bytes] | None = None
        self._cancel_start = threading.Event()

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it and every model in the repository are ready."""
        if self._process is not None:
            raise TritonServerError("this server was already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository not found: {self.model_repository}")
        distribution = find_distribution()
        self._workdir = Path(tempfile.mkdtemp(prefix="cts-tritonserver-"))
        backends = make_backend_directory(distribution, self._workdir)
        command = [
            str(distribution.server_binary),
            *server_arguments(
                model_repository=self.model_repository,
                backend_directory=backends,
                host=self.host,
                http_port=self.http_port,
                grpc_port=self.grpc_port,
                metrics_port=self.metrics_port,
                log_verbose=self.log_verbose,
                extra=self.extra_arguments,
            ),
        ]
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self.log_file.open("ab")
        logger.info(
            "starting tritonserver: repository {}, http {}, grpc {}, metrics {}",
            self.model_repository,
            self.http_url,
            self.grpc_url,
            self.metrics_url,
        )
        self._process = subprocess.Popen(
            command,
            env=server_environment(distribution, self.python_prefix),
            stdout=self._log_handle,  # None: inherit (the CLI shows the server's log)
            stderr=subprocess.STDOUT if self._log_handle is not None else None,
            stdin=subprocess.DEVNULL,
        )
        try:
            self.wait_until_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("tritonserver ready (pid {})", self._process.pid)

    def _get_json(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(
            f"http://{self.http_url}{path}", method=method, data=b"{}" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def _server_ready(self) -> bool:
        request = urllib.request.Request(f"http://{self.http_url}/v2/health/ready")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def model_states(self) -> dict[str, str]:
        """{model name: state} from the repository index (READY, UNAVAILABLE, LOADING...)."""
        index = self._get_json("/v2/repository/index", method="POST")
        if not isinstance(index, list):
            raise TritonServerError(f"unexpected repository index: {index!r}")
        return {entry["name"]: entry.get("state", "UNKNOWN") for entry in index}

    def cancel_start(self) -> None:
        """Make a `start` that is still waiting for readiness give up (signal handlers)."""
        self._cancel_start.set()

    def wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._cancel_start.is_set():
                raise TritonServerError("start cancelled before the server was ready")
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise TritonServerError(
                    f"tritonserver exited with code {code} before it was ready\n{self.log_tail()}"
                )
            if self._server_ready():
                states = self.model_states()
                not_ready = {name: s for name, s in states.items() if s != "READY"}
                if states and not not_ready:
                    return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def log_tail(self) -> str:
        """The server's error lines (why a model failed to load), then the end of its log."""
        if self.log_file is None or not self.log_file.exists():
            return "(server log went to the console)"
        lines = self.log_file.read_text(errors="replace").splitlines()
        errors = [line for line in lines if ERROR_LINE.match(line) or "UNAVAILABLE" in line]
        summary = "\n".join(errors)[-LOG_TAIL_CHARS:]
        tail = "\n".join(lines[-15:])
        return f"errors in {self.log_file}:\n{summary}\nlast lines:\n{tail}"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit, SIGKILL after ``timeout_s``; returns the exit code.
        A killed server cannot remove its python backend's shared-memory regions: they are
        removed here."""
        code = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver ignored SIGTERM for {} s: killing it", timeout_s)
                    regions = python_backend_regions(self._process.pid)
                    self._process.kill()
                    self._process.wait()
                    for region in regions:
                        region.unlink(missing_ok=True)
            code = self._process.returncode
            self._process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def wait(self) -> int:
        """Block until the server exits on its own; returns its exit code."""
        if self._process is None:
            raise TritonServerError("the server is not running")
        return self._process.wait()

    def __enter__(self) -> LocalTritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.triton.local_server",
        description="Serve a model repository with the tritonserver of the nvidia-pytriton "
        "wheel, in the foreground until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default=LOOPBACK, help="bind address (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--log-file", type=Path, default=None, help="default: the console")
    parser.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S)
    parser.add_argument("--log-verbose", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = _parse_arguments(argv)
    server = LocalTritonServer(
        arguments.model_repository,
        host=arguments.host,
        http_port=arguments.http_port,
        grpc_port=arguments.grpc_port,
        metrics_port=arguments.metrics_port,
        log_file=arguments.log_file,
        ready_timeout_s=arguments.ready_timeout,
        log_verbose=arguments.log_verbose,
    )
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal {} received: stopping tritonserver", signum)
        stop_requested.set()
        server.cancel_start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
    except TritonServerError as error:
        logger.error("{}", error)
        return 1
    try:
        # Wake up to notice either a stop request or the server dying on its own.
        while not stop_requested.wait(timeout=1.0):
            if not server.is_running():
                logger.error("tritonserver exited unexpectedly")
                return server.stop() or 1
    finally:
        code = server.stop()
    logger.info("tritonserver stopped (exit code {})", code)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def free_local_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so none repeats), for
    tests and benchmarks that start servers beside whatever else runs on the machine."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()

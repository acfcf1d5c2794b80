"""Housekeeping of an adapter: its health file, and the sweep of what dead adapters left.

The health file is touched every few seconds while the I/O loop runs; a container health
check (services/adapter/healthcheck.py) reads its age.


An adapter killed mid-study (kill -9, the OOM killer) runs none of its clean-up:

* **its temporary files**: the pipeline unpacks every input into a temporary work folder
  and removes it when the study is done; after a kill the unpacked DICOM files -- patient
  data -- would stay in the system temp folder. Each adapter process therefore keeps its
  temporary files under ``<tmp>/cts-adapter-<pid>/`` (:func:`use_own_temp_dir`);
* **its shared-memory region**: an adapter beside Triton passes each model input through
  ``/dev/shm/cts_<pid>_<hex>`` (see TritonBackend), reused from study to study and removed
  when the adapter stops;
  after a kill it stays (RAM: 221 MB for a full-size input) and may stay registered in
  Triton, which then keeps it mapped.

* **the prepared folders** (``storage/prepared/<task_id>/``, services/adapter/handoff.py)
  of tasks whose result is stored: the model stage removes them after storing, a kill in
  between leaves them.

Every adapter sweeps these when it starts and then every minute, for owners whose process is
gone. The owner's pid is read from the name, which is sound where the adapters that share
the temp folder and /dev/shm also share the process ids: one host or one container (the
local stack of start.sh; the compose files give each adapter its own /tmp and use gRPC).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import tritonclient.grpc as grpcclient
from loguru import logger
from tritonclient.utils import InferenceServerException

from services.adapter.handoff import sweep_prepared

HEALTH_INTERVAL_S = 5.0
SHM_DIR = Path("/dev/shm")
SWEEP_INTERVAL_S = 60.0
TEMP_DIR_PREFIX = "cts-adapter-"
# Names TritonBackend gives its regions: cts_<pid>_<12 hex> (reused by its requests), and
# cts_probe_<pid>_<8 hex> for the start-up probe.
REGION_NAME = re.compile(r"^cts_(?:probe_)?(?P<pid>[0-9]+)_[0-9a-f]{8,32}$")
TEMP_DIR_NAME = re.compile(r"^" + re.escape(TEMP_DIR_PREFIX) + r"(?P<pid>[0-9]+)$")

PidAlive = Callable[[int], bool]


class HealthFile:
    """Touched at most every HEALTH_INTERVAL_S while the adapter is alive (None: no file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last = 0.0

    def touch(self) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if now - self._last >= HEALTH_INTERVAL_S:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            self._last = now


def sweep_leftovers_forever(
    stop: threading.Event, triton_url: str, *, shared_memory: bool, storage_root: Path | None = None
) -> None:
    """Now and every SWEEP_INTERVAL_S until ``stop``: remove what adapters killed mid-study
    left behind (their unpacked studies; their shared memory when this adapter uses it; the
    prepared folders of finished tasks on the shared storage)."""
    while True:
        try:
            sweep_temp_dirs(temp_base())
            if storage_root is not None:
                sweep_prepared(storage_root)
            if shared_memory:
                sweep_shared_memory(triton_url)
        except Exception:  # noqa: BLE001 - housekeeping must never stop the adapter
            logger.exception("sweeping the leftovers of dead adapters failed")
        if stop.wait(SWEEP_INTERVAL_S):
            return


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def abandoned(names: Iterable[str], pattern: re.Pattern[str], alive: PidAlive) -> list[str]:
    """The names matching ``pattern`` whose owning process (group ``pid``) is gone."""
    found = []
    for name in names:
        match = pattern.match(name)
        if match and not alive(int(match.group("pid"))):
            found.append(name)
    return sorted(found)


def abandoned_regions(names: Iterable[str], alive: PidAlive = pid_alive) -> list[str]:
    return abandoned(names, REGION_NAME, alive)


# -- temporary files -------------------------------------------------------------------------------


def use_own_temp_dir(base: Path | None = None) -> Path:
    """Make this process create its temporary files (the pipeline's work folders) under
    ``<base>/cts-adapter-<pid>/``; returns that folder (the caller removes it at exit)."""
    folder = Path(base or tempfile.gettempdir()) / f"{TEMP_DIR_PREFIX}{os.getpid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    tempfile.tempdir = str(folder)
    return folder


def temp_base() -> Path:
    """The system temp folder, also after :func:`use_own_temp_dir` redirected tempfile."""
    current = Path(tempfile.gettempdir())
    return current.parent if TEMP_DIR_NAME.match(current.name) else current


def sweep_temp_dirs(base: Path, alive: PidAlive = pid_alive) -> list[str]:
    """Remove the temp folders of adapters that are gone; returns their names."""
    try:
        names = [path.name for path in base.iterdir() if path.is_dir()]
    except OSError:
        return []
    removed = []
    for name in abandoned(names, TEMP_DIR_NAME, alive):
        shutil.rmtree(base / name, ignore_errors=True)
        if not (base / name).exists():
            removed.append(name)
    if removed:
        logger.warning(
            "removed the temporary files of {} adapter(s) that died mid-study: {}",
            len(removed),
            ", ".join(removed),
        )
    return removed


# -- shared memory ---------------------------------------------------------------------------------


def sweep_shared_memory(
    triton_url: str, *, shm_dir: Path = SHM_DIR, alive: PidAlive = pid_alive
) -> list[str]:
    """Unregister from Triton and unlink every abandoned region; returns their names.

    Best effort: a server that is down or slow only keeps its registrations until the next
    sweep; the files (the memory) are removed regardless.
    """
    removed: list[str] = []
    try:
        files = [path.name for path in shm_dir.iterdir()]
    except OSError:
        files = []
    registered: list[str] = []
    client = None
    try:
        client = grpcclient.InferenceServerClient(triton_url)
        status = client.get_system_shared_memory_status(as_json=True, client_timeout=5)
        registered = list((status or {}).get("regions", {}))
    except (InferenceServerException, OSError) as error:
        logger.debug("shared-memory sweep: Triton not asked ({})", error)
    for name in abandoned_regions(registered, alive):
        try:
            assert client is not None
            client.unregister_system_shared_memory(name, client_timeout=5)
            removed.append(name)
        except InferenceServerException as error:
            logger.debug("shared-memory sweep: could not unregister {}: {}", name, error)
    for name in abandoned_regions(files, alive):
        try:
            (shm_dir / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass  # another adapter swept it first
        except OSError as error:
            logger.warning("shared-memory sweep: could not remove {}: {}", name, error)
    if client is not None:
        client.close()
    if removed:
        logger.warning(
            "removed {} shared-memory region(s) of adapters that died mid-request: {}",
            len(set(removed)),
            ", ".join(sorted(set(removed))),
        )
    return sorted(set(removed))

"""What a service leaves on disk: its log appended to across restarts and rotated at its
configured size (services/core/logging_setup.py), and every file and folder it writes its
user's alone (services/monitoring/runner.py: folders 0700, files 0600), with the real DICOM
listener started, fed by DCMTK and stopped twice."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_door_support import CHEST, storescu
from stack_support import wait_for

from services.dicom_listener.healthcheck import echo
from services.triton.local_server import free_local_ports

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WRITE_LINES = """
import sys
from loguru import logger
from services.core.config import load_settings
from services.monitoring.runner import prepare_process
prepare_process(load_settings())
for number in range(int(sys.argv[1])):
    logger.info("{} line {:04d} {}", sys.argv[2], number, "x" * 400)
"""


def clean_environment(**values: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CTS")}
    return {**environment, **values}


def write_lines(count: int, run: str, environment: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "-c", WRITE_LINES, str(count), run],
        env=environment,
        cwd=PROJECT_ROOT,
        check=True,
        timeout=120,
    )


def private(path: Path) -> list[str]:
    """What under ``path`` another user could read: folders not 0700, files not 0600."""
    found = []
    for item in [path, *path.rglob("*")]:
        mode = stat.S_IMODE(item.lstat().st_mode)
        wanted = 0o700 if item.is_dir() else 0o600
        if mode != wanted:
            found.append(f"{item.relative_to(path.parent)} {mode:o}")
    return found


def test_a_log_is_appended_across_restarts_and_rotated_at_its_size(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "service.log"
    environment = clean_environment(
        CTS__LOGGING__FILE=str(log),
        CTS__LOGGING__ROTATION_MB="0.01",  # 10 KiB: about 20 lines of this test
        CTS__LOGGING__KEEP_FILES="3",
    )
    write_lines(5, "first", environment)
    write_lines(5, "second", environment)  # a restart appends
    text = log.read_text()
    assert text.count("first line") == 5
    assert text.count("second line") == 5
    write_lines(200, "third", environment)  # about 90 KiB: rotated many times
    rotated = sorted(path for path in log.parent.iterdir() if path != log)
    assert len(rotated) == 3  # keep_files: the older ones were removed
    limit = int(0.01 * 1024 * 1024)
    for path in [*rotated, log]:
        assert path.stat().st_size <= limit + 600  # never more than a line past the size
        assert path.name.startswith("service.")
        assert path.suffix == ".log"
    assert "third line 0199" in log.read_text()  # the newest line in the current file
    assert private(log.parent) == []  # 0700 folder, 0600 files


@pytest.fixture
def listener_environment(tmp_path: Path) -> dict[str, str]:
    storage = tmp_path / "storage"
    environment = clean_environment(
        CTS__STORAGE__ROOT=str(storage),
        CTS__METRICS__ENABLED="false",
        CTS__DICOM__PORT=str(free_local_ports(1)[0]),
        CTS__DICOM__STUDY_QUIET_SECONDS="600",  # received, never closed: no broker needed
        CTS__DICOM__ALLOWED_CALLING_AE_TITLES="[MODALITY]",
        CTS__LOGGING__FILE=str(tmp_path / "logs" / "dicom-listener.log"),
    )
    subprocess.run(
        [sys.executable, "-m", "services.registry", "upgrade"],
        env=environment,
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    return environment


def run_listener(environment: dict[str, str], files: list[Path]) -> None:
    """The listener as start.sh runs it: up (its health check answers), a study, SIGTERM."""
    port = int(environment["CTS__DICOM__PORT"])
    process = subprocess.Popen(
        [sys.executable, "-m", "services.dicom_listener"],
        env=environment,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: process.poll() is None and echo(port, "CTS", 2.0), 60, "the listener")
        sent = storescu(port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        _out, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors[-2000:]
    assert errors == ""  # every line of its own went to its log file


@pytest.mark.slow
def test_the_listener_keeps_its_log_and_its_files_to_itself(
    listener_environment: dict[str, str], fixtures_dir: Path, tmp_path: Path
) -> None:
    files = sorted((fixtures_dir / CHEST).iterdir())[:2]
    run_listener(listener_environment, files[:1])
    run_listener(listener_environment, files[1:])  # a restart goes on with the same study
    log = Path(listener_environment["CTS__LOGGING__FILE"]).read_text()
    assert log.count("DICOM listener CTS on 127.0.0.1") == 2
    assert log.count("dicom listener stopped") == 2
    storage = Path(listener_environment["CTS__STORAGE__ROOT"])
    received = list((storage / "dicom" / "studies").rglob("*.dcm"))
    assert len(received) == 2
    # The test made the storage root (its umask); everything the listener wrote is private.
    assert private(storage / "dicom") == []
    assert private(tmp_path / "logs") == []

"""The batch CLI's progress bar stays one line on a terminal: the log goes to a file and only
warnings are printed above the bar; without a terminal there is no bar and the log goes to
stderr (services/batch/__main__.py)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
import zipfile
from pathlib import Path

import pytest
from batch_support import batch_command, run_batch

from services.batch.__main__ import LOG_FILE_NAME

pytestmark = pytest.mark.slow  # two batch runs in subprocesses

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TERMINAL_ROWS, TERMINAL_COLUMNS = 40, 120


def run_on_a_terminal(arguments: list[str]) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal of a real size; its whole output."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(
        terminal, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0)
    )
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen(
        arguments,
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        cwd=PROJECT_ROOT,
        env=environment,
    )
    os.close(terminal)
    output = bytearray()
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not data:
            break
        output.extend(data)
    os.close(controller)
    return process.wait(timeout=300), output.decode("utf-8", errors="replace")


def make_inputs(fixtures_dir: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("chest_ct_lung_dx_a0002", "mr_brain_t1"):
        with zipfile.ZipFile(folder / f"{name}.zip", "w") as archive:
            for path in sorted((fixtures_dir / name).iterdir()):
                archive.write(path, arcname=path.name)
    (folder / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    return folder


def test_on_a_terminal_the_bar_keeps_one_line_and_the_log_goes_to_a_file(
    fixtures_dir: Path, tiny_model_repository: Path, tmp_path: Path
) -> None:
    inputs = make_inputs(fixtures_dir, tmp_path / "inputs")
    output = tmp_path / "output"
    code, text = run_on_a_terminal(
        batch_command(inputs, output, "--model-repository", tiny_model_repository)
    )
    assert code == 0, text[-3000:]
    # What stays on the screen: each line as the last carriage return left it.
    screen = [line.split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n")]
    bars = [line for line in screen if line.startswith("studies:")]
    assert len(bars) == 1, screen  # one bar line, updated in place
    assert "3/3" in bars[0], screen
    assert text.count("\rstudies:") >= 4  # it was redrawn, not printed again below
    # The one warning (the broken zip) is printed above the bar, on its own line.
    assert any(line.startswith("WARNING: ") for line in screen), screen
    assert "| INFO" not in text
    log = (output / LOG_FILE_NAME).read_text()
    assert "| INFO" in log
    assert "onnxruntime backend: repository" in log
    assert f"log: {output / LOG_FILE_NAME}" in text
    assert "3 studies from 3 inputs" in text


def test_without_a_terminal_there_is_no_bar_and_the_log_is_on_stderr(
    fixtures_dir: Path, tiny_model_repository: Path, tmp_path: Path
) -> None:
    inputs = make_inputs(fixtures_dir, tmp_path / "inputs")
    output = tmp_path / "output"
    completed = run_batch(inputs, output, "--model-repository", tiny_model_repository)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "%|" not in completed.stderr  # a bar in a file would be one line per update
    assert "| INFO" in completed.stderr
    assert not (output / LOG_FILE_NAME).exists()

"""Running the batch CLI in a process of its own, as a user would, and reading its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from openpyxl import load_workbook

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def batch_command(*arguments: str | Path) -> list[str]:
    """``python -m services.batch ARGUMENTS`` with this interpreter."""
    return [sys.executable, "-m", "services.batch", *map(str, arguments)]


def run_batch(
    *arguments: str | Path,
    cwd: Path | None = None,
    environment: dict[str, str] | None = None,
    timeout_s: float = 300,
) -> subprocess.CompletedProcess:
    """Run the batch; the project is importable whatever ``cwd`` is."""
    env = {**(os.environ if environment is None else environment), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        batch_command(*arguments),
        cwd=cwd or PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def screen_with(
    repository: Path, inputs: Path, output: Path, **options
) -> subprocess.CompletedProcess:
    """The batch screening ``inputs`` into ``output`` with the model repository ``repository``
    (``options``: as run_batch's)."""
    return run_batch(inputs, output, "--model-repository", repository, **options)


def report_rows(output: Path) -> list[dict]:
    """The rows of OUTPUT/output.xlsx as dictionaries keyed by the header."""
    rows = list(load_workbook(output / "output.xlsx")["report"].iter_rows(values_only=True))
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]

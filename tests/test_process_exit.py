"""Ending a one-shot process without the interpreter's teardown (services/core/process_exit):
whatever the normal exit would finish is finished, and the status is the caller's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A process that leaves work for the interpreter's exit: an atexit handler, a temporary
# folder removed by its finaliser, a loguru file sink, a thread that is not a daemon and
# is still writing, a thread pool never shut down (its idle worker waits for the
# interpreter's wake-up), and standard output without a newline (block-buffered into a
# pipe).
LEAVES_WORK = textwrap.dedent(
    """
    import atexit, sys, tempfile, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from loguru import logger
    from services.core.process_exit import exit_without_teardown

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    folder = tempfile.TemporaryDirectory(dir=out)
    (out / "temporary").write_text(folder.name)
    logger.remove()
    logger.add(out / "log.txt", level="INFO", buffering=1 << 16)
    logger.info("the last line")

    def slow_writer():
        time.sleep(0.5)
        (out / "thread").write_text("done")

    threading.Thread(target=slow_writer).start()
    idle_pool = ThreadPoolExecutor(max_workers=1)
    idle_pool.submit(lambda: None).result()
    sys.stdout.write("no newline at the end")
    exit_without_teardown(int(sys.argv[2]))
    (out / "after").write_text("must not run")
    """
)


def _run(tmp_path: Path, status: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LEAVES_WORK, str(tmp_path), str(status)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_exit_finishes_what_the_interpreter_would(tmp_path: Path) -> None:
    completed = _run(tmp_path, 0)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "no newline at the end"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    assert "the last line" in (tmp_path / "log.txt").read_text()
    assert not Path((tmp_path / "temporary").read_text()).exists()
    assert not (tmp_path / "after").exists()


def test_the_status_is_the_caller_s(tmp_path: Path) -> None:
    assert _run(tmp_path, 2).returncode == 2

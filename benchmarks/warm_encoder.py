"""One warm run of the encoder in a process of its own, for the cold start's pairs:
``python -m benchmarks.warm_encoder MODEL INPUT.npy`` loads a session with the backend's
options, runs it once to warm it, times one more run and prints ``{"wall_s", "cpu_s"}``.

Why a process of its own: on these virtual machines a batch that started while another
process held a warm encoder session (2.2 GB resident) prepared its study and ran its first
inference about 3 s slower in all than one that started alone (benchmarks/README.md,
"Cold start, 2026-12-06 09:30-10:05 UTC"). The pair's warm run therefore ends, and its
memory is freed, before the batch it is paired with starts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks import PROJECT_ROOT
from benchmarks.limit import Timing, timed_once
from services.core.inference.onnxruntime_backend import session_options


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.warm_encoder",
        description="Time one warm run of an encoder model (prints JSON).",
    )
    parser.add_argument("model", type=Path, help="the encoder's ONNX file")
    parser.add_argument("volume", type=Path, help="the model input, saved with numpy.save")
    arguments = parser.parse_args(argv)
    session = ort.InferenceSession(
        str(arguments.model), session_options(0), providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: np.load(arguments.volume)}
    session.run(None, feed)
    timing = timed_once(lambda: session.run(None, feed))
    print(json.dumps({"wall_s": timing.wall_s, "cpu_s": timing.cpu_s}))
    return 0


def warm_encoder_in_new_process(model: Path, volume_file: Path) -> Callable[[], Timing]:
    """A callable that times one warm run of ``model`` on the saved model input, each call
    in a new process that has exited when it returns."""

    def timed() -> Timing:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.warm_encoder", str(model), str(volume_file)],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        lines = completed.stdout.strip().splitlines()
        if completed.returncode != 0 or not lines:
            raise RuntimeError(
                f"the warm encoder run exited {completed.returncode}:\n{completed.stderr[-3000:]}"
            )
        measured = json.loads(lines[-1])  # the last line: onnxruntime logs to stderr
        return Timing(wall_s=float(measured["wall_s"]), cpu_s=float(measured["cpu_s"]))

    return timed


if __name__ == "__main__":
    sys.exit(main())

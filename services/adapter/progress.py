"""What the submitter sees of a task in progress: the stage, a fraction and a message.

Each stage starts at a fixed point of a study's share of the bar (STAGE_PROGRESS). The model
request is the longest stage and gives no sign of life, so while it runs a ticker moves the
bar by time: the elapsed seconds against the model's recent durations on this adapter
(InferenceTimes), never past the stage's end.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

ProgressCallback = Callable[[str, float, str], None]  # stage, fraction 0..1, message

# Where each stage starts within one study's share of the progress bar.
STAGE_PROGRESS = {
    "selection": 0.0,
    "volume": 0.1,
    "chest_check": 0.3,
    "preprocessing": 0.4,
    "inference": 0.5,
    "findings": 0.95,
}
STAGE_MESSAGES = {
    "intake": "unpacking the upload",
    "headers": "reading the DICOM headers",
    "selection": "choosing the series",
    "volume": "reading the images",
    "chest_check": "checking that it is a chest CT",
    "preprocessing": "preparing the model input",
    "inference": "running the model",
    "findings": "reading the model's answer",
}
READING_SHARE = 0.1  # intake and headers, before the studies are known
WRITING_FRACTION = 0.9
TICK_SECONDS = 1.0  # one progress message a second while the model runs
RECENT_RUNS = 5  # model durations remembered; the median ignores one slow outlier
UNKNOWN_DURATION_S = 30.0  # time scale of the bar before the first duration is known
MAX_MODEL_SHARE = 0.97  # the bar stops short of the stage's end until the model answers


def study_progress(stage: str, study_index: int, n_studies: int) -> float:
    """Overall fraction 0..1 when ``stage`` of study ``study_index`` (of n) begins."""
    if n_studies <= 0:
        return READING_SHARE * (0.5 if stage == "headers" else 0.0)
    within = STAGE_PROGRESS.get(stage, 0.0)
    share = (WRITING_FRACTION - READING_SHARE) / n_studies
    return READING_SHARE + share * (study_index + within)


class InferenceTimes:
    """Recent model durations of one adapter (thread-safe; shared by its tasks)."""

    def __init__(self, remembered: int = RECENT_RUNS) -> None:
        self._seconds: deque[float] = deque(maxlen=remembered)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._seconds.append(max(0.0, seconds))

    def expected(self) -> float | None:
        with self._lock:
            return statistics.median(self._seconds) if self._seconds else None


def model_share(elapsed_s: float, expected_s: float | None) -> float:
    """How far through the model stage (0..MAX_MODEL_SHARE) after ``elapsed_s``."""
    if expected_s is None or expected_s <= 0:
        # No duration known yet: a bar that slows down instead of one that lies about the end.
        share = 1.0 - math.exp(-elapsed_s / UNKNOWN_DURATION_S)
    else:
        share = elapsed_s / expected_s
    return min(max(share, 0.0), MAX_MODEL_SHARE)


def model_message(elapsed_s: float, expected_s: float | None, prefix: str) -> str:
    if expected_s is None:
        return f"{prefix}: {elapsed_s:.0f} s so far (no duration measured yet on this worker)"
    if elapsed_s > expected_s:
        return f"{prefix}: taking longer than the usual {expected_s:.0f} s"
    return f"{prefix}: about {max(1, math.ceil(expected_s - elapsed_s))} s left"


class ModelTicker:
    """Sends a time-based progress message every TICK_SECONDS while the model runs."""

    def __init__(
        self,
        report: ProgressCallback,
        *,
        start: float,
        end: float,
        expected_s: float | None,
        prefix: str,
        tick_s: float = TICK_SECONDS,
    ) -> None:
        self._report = report
        self._start, self._end = start, end
        self._expected_s = expected_s
        self._prefix = prefix
        self._tick_s = tick_s
        self._stop = threading.Event()
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="model-progress", daemon=True)

    def start(self) -> ModelTicker:
        self.send()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self._began

    def send(self) -> None:
        elapsed = self.elapsed()
        share = model_share(elapsed, self._expected_s)
        fraction = self._start + (self._end - self._start) * share
        self._report("inference", fraction, model_message(elapsed, self._expected_s, self._prefix))

    def _run(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.send()
            except Exception:  # noqa: BLE001 - progress is best effort, never a failure
                return

    def stop(self) -> float:
        """Stop ticking; the seconds the model took."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self._tick_s + 1.0)
        return self.elapsed()


class ProgressRelay:
    """The progress callback of one task: forwards messages, and keeps a model-server retry
    visible (the model ticker's next message would otherwise hide it within a second)."""

    def __init__(self, send: ProgressCallback) -> None:
        self._send = send
        self._retry_note: str | None = None
        self._fraction = 0.0

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if stage == "inference" and self._retry_note:
            message = f"{message}; {self._retry_note}"
        elif stage != "inference":
            self._retry_note = None
        self._fraction = fraction
        self._send(stage, fraction, message)

    def retrying(self, message: str) -> None:
        self._retry_note = message
        self._send("retrying", self._fraction, message)

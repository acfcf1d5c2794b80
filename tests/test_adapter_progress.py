"""Progress of a task: stage fractions, the time-based bar while the model runs, a retry kept
visible, the model's measured durations (services/adapter/progress.py, task_runner.TaskEvents)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from services.adapter import task_runner
from services.adapter.progress import (
    MAX_MODEL_SHARE,
    STAGE_PROGRESS,
    InferenceTimes,
    ModelTicker,
    ProgressRelay,
    model_message,
    model_share,
    study_progress,
)
from services.adapter.task_runner import TaskEvents
from services.adapter.viewer_data import ViewerStack
from services.core.pipeline.events import STAGES
from services.core.schemas import ProcessingStatus, StudyReport
from services.core.volume import Volume


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[str, float, str]] = []
        self.lock = threading.Lock()

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        with self.lock:
            self.messages.append((stage, fraction, message))


def test_stages_move_the_bar_forward_study_by_study() -> None:
    # The pipeline's stages of one study (intake and headers come before the studies are known),
    # each with its place on the bar.
    stages = [stage for stage in STAGES if stage not in ("intake", "headers")]
    assert set(stages) == set(STAGE_PROGRESS)
    points = [study_progress(stage, index, 2) for index in range(2) for stage in stages]
    assert points == sorted(points)
    assert len(set(points)) == len(points)
    assert points[0] > 0.0
    assert points[-1] < 0.9


def test_the_model_share_follows_the_measured_duration() -> None:
    assert model_share(5.0, 10.0) == pytest.approx(0.5)
    assert model_share(50.0, 10.0) == MAX_MODEL_SHARE  # late: never "done" before the answer
    unknown = [model_share(seconds, None) for seconds in (1.0, 10.0, 100.0, 1000.0)]
    assert unknown == sorted(unknown)
    assert unknown[-1] <= MAX_MODEL_SHARE
    assert model_message(3.0, 10.0, "running the model") == "running the model: about 7 s left"
    assert "longer than the usual 10 s" in model_message(12.0, 10.0, "running the model")
    assert "no duration measured" in model_message(3.0, None, "running the model")


def test_inference_times_take_the_median_of_the_recent_runs() -> None:
    times = InferenceTimes(remembered=3)
    assert times.expected() is None
    for seconds in (10.0, 11.0, 95.0, 12.0):  # 95 s: one wait through a model-server outage
        times.add(seconds)
    assert times.expected() == 12.0  # the last three: 11, 95, 12


def test_the_ticker_moves_the_bar_by_time_while_the_model_runs() -> None:
    recorder = Recorder()
    ticker = ModelTicker(
        recorder, start=0.5, end=0.9, expected_s=0.3, prefix="running the model", tick_s=0.05
    ).start()
    time.sleep(0.25)
    seconds = ticker.stop()
    fractions = [fraction for stage, fraction, _ in recorder.messages if stage == "inference"]
    assert len(fractions) >= 3
    assert fractions == sorted(fractions)
    assert fractions[-1] > fractions[0]
    assert fractions[0] >= 0.5
    assert fractions[-1] <= 0.5 + 0.4 * MAX_MODEL_SHARE
    assert 0.2 < seconds < 2.0
    count = len(recorder.messages)
    time.sleep(0.15)
    assert len(recorder.messages) == count  # stopped means stopped


def test_a_retry_stays_visible_while_the_model_ticks() -> None:
    recorder = Recorder()
    relay = ProgressRelay(recorder)
    relay("inference", 0.6, "running the model: about 9 s left")
    relay.retrying("model server unavailable, retrying in 4 s")
    relay("inference", 0.62, "running the model: about 8 s left")
    relay("findings", 0.95, "reading the model's answer")
    relay("inference", 0.7, "running the model: about 3 s left")
    assert recorder.messages[1] == ("retrying", 0.6, "model server unavailable, retrying in 4 s")
    assert recorder.messages[2][2].endswith("model server unavailable, retrying in 4 s")
    assert "retrying" not in recorder.messages[4][2]  # a later stage clears the note


def test_task_events_measure_the_model_and_report_it_by_time(tmp_path: Path) -> None:
    recorder = Recorder()
    times = InferenceTimes()
    events = TaskEvents(recorder, tmp_path, inference_times=times)
    events.stage_started("inference", study_index=0, n_studies=1)
    time.sleep(0.1)
    events.stage_started("findings", study_index=0, n_studies=1)
    report = StudyReport(path_to_study="a.zip", processing_status=ProcessingStatus.SUCCESS)
    events.study_finished(report, study_index=0, n_studies=1)
    assert events.finish() == []
    stages = [stage for stage, _fraction, _message in recorder.messages]
    assert stages[0] == "inference"
    assert "findings" in stages
    assert stages[-1] == "study finished"
    expected = times.expected()
    assert expected is not None
    assert 0.09 < expected < 2.0
    # The next study's bar knows how long the model takes.
    events = TaskEvents(recorder, tmp_path, inference_times=times)
    events.stage_started("inference", study_index=0, n_studies=1)
    events.finish()
    assert recorder.messages[-1][2].startswith("running the model: about")


def _volume(hu: np.ndarray) -> Volume:
    return Volume(
        hu=hu,
        row_cosine=np.array([1.0, 0.0, 0.0]),
        column_cosine=np.array([0.0, 1.0, 0.0]),
        slice_normal=np.array([0.0, 0.0, 1.0]),
        spacing_mm=(2.0, 1.0, 1.0),
        origin_mm=np.zeros(3),
    )


def test_the_viewer_data_is_made_beside_the_pipeline_and_never_fails_it(tmp_path: Path) -> None:
    events = TaskEvents(None, tmp_path)
    threads: list[str] = []
    original = task_runner.viewer_stack

    def recorded(volume: Volume) -> ViewerStack:
        threads.append(threading.current_thread().name)
        return original(volume)

    hu = np.full((8, 12, 16), -1000.0, dtype=np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(task_runner, "viewer_stack", recorded)
        events.volume_loaded(_volume(hu), study_index=0, n_studies=2)
        # A volume the viewer cannot reduce (not 3-D) is logged, and the other study's files
        # are still written.
        events.volume_loaded(_volume(hu[0]), study_index=1, n_studies=2)
        written = events.finish()
    assert len(threads) == 2  # both studies' volumes reached the reduction
    assert all(name.startswith("side-files") for name in threads)
    assert sorted(path.name for path in written) == ["study1.bin", "study1.json"]

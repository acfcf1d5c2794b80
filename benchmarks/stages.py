"""Every pipeline stage of one study, with its peak memory and the reference baselines.

Each pass is ``process_input`` (then ``write_reports``): times come from the report's stage
clock, its ``inference`` split into encoder and heads by :class:`TimedBackend`, which also
times the body-part regression network inside the chest check (when the repository serves
one); memory is
read at the pipeline's ``stage_started`` events (``benchmarks.measure.StageMemory``). One
untimed warm-up pass with tracemalloc, then ``repetitions`` timed passes. In each pass the
reference implementation reads the same files (extracted once, outside every clock) and
preprocesses them with torch; its output is compared with the pipeline's model input.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.embedded import run_study
from benchmarks.measure import StageMemory, StageSamples, machine, reset_peak_rss, status_mib
from benchmarks.reference import preprocess_with_torch, read_series_plainly
from services.core.arrays import AnyArray, BprScores, BprSlices, Float32Array, ModelInput
from services.core.config import InferenceSettings, Settings
from services.core.inference.onnxruntime_backend import OnnxRuntimeBackend
from services.core.intake import collect_dicom_files
from services.core.model_metadata import ENCODER_NAME
from services.core.pipeline import PreparedStudy, preprocessing_target
from services.core.reports import write_reports

# A table row -> the measured stages it sums: the pipeline clock's own names
# (services/core/pipeline/events.py STAGES), the two models, the report files, the baselines.
ROW_STAGES: dict[str, tuple[str, ...]] = {
    "intake": ("intake",),
    "headers": ("headers", "selection"),
    "volume": ("volume",),
    "chest check": ("chest_check",),
    "body-part regression": ("bpr network",),  # inside the chest check
    "preprocessing": ("preprocessing",),
    "encoder": ("encoder",),
    "heads": ("heads",),
    "report": ("findings", "report files"),
    "reference read": ("reference read",),
    "reference preprocessing": ("reference preprocessing",),
}


class TimedBackend(OnnxRuntimeBackend):
    """The embedded backend unchanged, with a stopwatch and a memory reading around each
    model: the pipeline's clock has one ``inference`` stage, the table an encoder row and a
    heads row."""

    def __init__(self, repository: Path, settings: InferenceSettings) -> None:
        super().__init__(repository, settings)
        self.memory: StageMemory | None = None  # set for the passes that read memory
        self.seconds: dict[str, float] = {}  # by stage, summed until reset
        model = self.body_part_model
        if model is not None:
            scores = model.score_slices

            def timed_scores(slices: BprSlices) -> BprScores:
                started = time.perf_counter()
                result = scores(slices)
                elapsed = time.perf_counter() - started
                self.seconds["bpr network"] = self.seconds.get("bpr network", 0.0) + elapsed
                return result

            self.body_part_model = dataclasses.replace(model, score_slices=timed_scores)

    def _run(self, model: str, output: tuple[str, ...], array: Float32Array) -> AnyArray:
        stage = "encoder" if model == ENCODER_NAME else "heads"
        if self.memory is not None:
            self.memory.begin(stage)
        started = time.perf_counter()
        result = super()._run(model, output, array)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started
        return result


class _PassEvents(StageMemory):
    """Memory per stage, and the model input, kept for the comparison with the reference."""

    model_input: ModelInput | None = None

    def model_input_ready(self, prepared: PreparedStudy) -> None:
        self.model_input = prepared.model_input


@dataclass
class StudyResult:
    name: str
    n_slices: int
    stages: dict[str, StageSamples]  # by ROW_STAGES key
    reference_max_abs_diff: float  # torch reference vs our preprocessing
    end_to_end_s: float  # process_input + write_reports, whole study, one plain run
    end_to_end_peak_mib: float  # peak RSS during it above its start


def benchmark_study(
    study_zip: Path,
    *,
    settings: Settings,
    backend: TimedBackend,
    repetitions: int,
) -> StudyResult:
    """``repetitions`` timed passes after one warm-up pass (memory only)."""
    torch.set_num_threads(machine().physical_cores)
    samples = {row: StageSamples() for row in ROW_STAGES}
    max_diff, n_slices = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="cts-bench-reference-") as folder:
        files = collect_dicom_files(study_zip, Path(folder), settings.intake).dicom_files
        for repetition in range(repetitions + 1):
            timed = repetition > 0
            seconds, peaks, diff, n_slices = _one_pass(
                study_zip, files, settings=settings, backend=backend, traced=not timed
            )
            for row, parts in ROW_STAGES.items():
                samples[row].peak_mib.append(max(peaks.get(part, 0.0) for part in parts))
                if timed:
                    samples[row].seconds.append(sum(seconds[part] for part in parts))
            max_diff = max(max_diff, diff)
    with tempfile.TemporaryDirectory(prefix="cts-bench-report-") as output:
        reset_peak_rss()
        start_rss = status_mib("VmRSS")
        end_to_end_s, _ = run_study(
            study_zip, backend=backend, settings=settings, output=Path(output)
        )
        end_to_end_peak = status_mib("VmHWM") - start_rss
    return StudyResult(study_zip.name, n_slices, samples, max_diff, end_to_end_s, end_to_end_peak)


def _one_pass(
    study_zip: Path, files: list[Path], *, settings: Settings, backend: TimedBackend, traced: bool
) -> tuple[dict[str, float], dict[str, float], float, int]:
    """Seconds and peak MiB by stage, the reference's max abs difference, the slices."""
    events = _PassEvents(traced=traced)
    backend.memory, backend.seconds = events, {}
    try:
        _, report = run_study(study_zip, backend=backend, settings=settings, events=events)
    finally:
        backend.memory = None
    assert report.quality is not None  # run_study refuses a study that was not screened
    # A repository without a body-part regression model spends nothing on it.
    seconds = {"bpr network": 0.0, **report.stage_seconds, **backend.seconds}
    with (
        tempfile.TemporaryDirectory(prefix="cts-bench-report-") as output,
        _measured(events, "report files", seconds),
    ):
        write_reports([report], Path(output))
    # The reference runs after the whole pipeline, as a separate program would.
    with _measured(events, "reference read", seconds):
        hu, spacing = read_series_plainly(files)
    with _measured(events, "reference preprocessing", seconds):
        reference = preprocess_with_torch(hu, spacing, preprocessing_target(backend.metadata))
    del hu
    assert events.model_input is not None, "the pipeline announced no model input"
    diff = float(np.abs(reference - events.model_input[0, 0]).max())
    return seconds, events.peaks, diff, report.quality.n_slices


@contextmanager
def _measured(memory: StageMemory, name: str, seconds: dict[str, float]) -> Iterator[None]:
    with memory.stage(name):
        started = time.perf_counter()
        yield
        seconds[name] = time.perf_counter() - started

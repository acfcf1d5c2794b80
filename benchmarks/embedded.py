"""Every stage of the embedded pipeline on one study zip, with the reference baselines.

The stages are the pipeline's own functions called in the order ``services.core.pipeline``
calls them, each timed and its peak memory taken (see ``benchmarks.measure``):

    intake -> headers (+ series selection) -> volume (decode + geometry) -> chest check
    -> preprocessing -> encoder -> heads -> report (findings + xlsx/json/warnings files)

In the same repetition, on the same extracted files, the reference implementation reads
the series (``reference read`` vs headers + volume) and preprocesses it with torch
(``reference preprocessing`` vs preprocessing); its output is compared with ours.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.measure import StageRecorder, peak_rss_mib, reset_peak_rss, rss_mib
from benchmarks.reference import preprocess_with_torch, read_series_plainly
from services.core.chest_check import check_chest
from services.core.config import Settings
from services.core.dicom import load_volume, read_studies, select_series
from services.core.findings import resolve_thresholds
from services.core.inference.base import ModelOutputs
from services.core.inference.base import pathology_probabilities as pathology_column
from services.core.inference.onnxruntime_backend import (
    OnnxRuntimeBackend,
    onnx_paths,
    session_options,
)
from services.core.intake import collect_dicom_files
from services.core.model_metadata import (
    BINARY_HEAD_NAME,
    ENCODER_NAME,
    MULTILABEL_HEAD_NAME,
    read_metadata,
)
from services.core.pipeline import (
    PreparedStudy,
    finish_study,
    preprocessing_target,
    process_input,
)
from services.core.preprocessing import preprocess_volume, to_model_input
from services.core.reports import write_reports
from services.core.schemas import ProcessingStatus, StudyReport

PIPELINE_STAGES = (
    "intake",
    "headers",
    "volume",
    "chest check",
    "preprocessing",
    "encoder",
    "heads",
    "report",
)
REFERENCE_STAGES = ("reference read", "reference preprocessing")


@dataclass
class StudyResult:
    name: str
    n_files: int
    volume_shape: tuple[int, ...]
    recorder: StageRecorder
    reference_max_abs_diff: float  # torch reference vs our preprocessing
    end_to_end_s: float  # process_input, whole study, same backend
    end_to_end_peak_mib: float  # peak RSS during process_input above its start
    end_to_end_stages: dict[str, float] = field(default_factory=dict)


class ModelSessions:
    """The encoder and the heads as the backend configures them, run stage by stage."""

    def __init__(self, repository: Path, threads: int) -> None:
        options = session_options(threads)
        paths = onnx_paths(repository)
        providers = ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(paths[name]), options, providers=providers)
            for name in (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME)
        }

    def _run(self, name: str, array: np.ndarray) -> np.ndarray:
        session = self.sessions[name]
        return session.run(None, {session.get_inputs()[0].name: array})[0]

    def encoder(self, model_input: np.ndarray) -> np.ndarray:
        return self._run(ENCODER_NAME, model_input)

    def heads(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._run(BINARY_HEAD_NAME, embedding), self._run(MULTILABEL_HEAD_NAME, embedding)


def benchmark_study(
    study_zip: Path,
    *,
    settings: Settings,
    sessions: ModelSessions,
    backend: OnnxRuntimeBackend,
    repetitions: int,
    torch_threads: int,
) -> StudyResult:
    """``repetitions`` timed passes over every stage after one warm-up pass (memory only)."""
    torch.set_num_threads(torch_threads)
    metadata = read_metadata(settings.inference.model_repository)
    target = preprocessing_target(metadata)
    thresholds = resolve_thresholds(metadata, settings.inference)
    recorder = StageRecorder()
    max_diff = 0.0
    n_files = 0
    shape: tuple[int, ...] = ()
    for repetition in range(repetitions + 1):
        recorder.timed = repetition > 0
        work_dir = Path(tempfile.mkdtemp(prefix="cts-bench-"))
        try:
            with recorder.stage("intake"):
                intake = collect_dicom_files(study_zip, work_dir / "files", settings.intake)
            with recorder.stage("headers"):
                (study,) = read_studies(intake.dicom_files, intake.summary)
                series = select_series(study, settings.series_selection).selected
            assert series is not None, "the benchmark study has no usable series"
            with recorder.stage("volume"):
                volume, quality, warnings = load_volume(series, settings.quality)
            with recorder.stage("chest check"):
                evidence = check_chest(study, series, volume, settings.chest_check)
            assert evidence.is_chest, evidence.reason
            with recorder.stage("preprocessing"):
                model_input = to_model_input(preprocess_volume(volume, target))
            shape, n_files = volume.hu.shape, len(intake.dicom_files)
            del volume
            with recorder.stage("encoder"):
                embedding = sessions.encoder(model_input)
            with recorder.stage("heads"):
                pathology, findings = sessions.heads(embedding)
            with recorder.stage("report"):
                prepared = PreparedStudy(
                    report=StudyReport(
                        path_to_study=study_zip.name,
                        study_uid=study.study_uid,
                        series_uid=series.series_uid,
                        processing_status=ProcessingStatus.FAILURE,
                        intake=intake.summary,
                        quality=quality,
                        chest_check=evidence,
                        warnings=warnings,
                    ),
                    model_input=None,
                    index=0,
                    n_studies=1,
                    shared_seconds=0.0,
                )
                outputs = ModelOutputs(
                    embedding=embedding,
                    pathology_probability=pathology_column(pathology),
                    finding_probabilities=np.asarray(findings, dtype=np.float32),
                )
                report = finish_study(
                    prepared,
                    outputs,
                    metadata=metadata,
                    thresholds=thresholds,
                    backend_name="onnxruntime",
                    inference_seconds=0.0,
                )
                write_reports([report], work_dir / "report")

            # The reference runs after the whole pipeline, as a separate program would.
            with recorder.stage("reference read"):
                hu, spacing = read_series_plainly(intake.dicom_files)
            with recorder.stage("reference preprocessing"):
                reference = preprocess_with_torch(hu, spacing, target)
            del hu
            max_diff = max(max_diff, float(np.abs(reference - model_input[0, 0]).max()))
            del reference, model_input
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    end_to_end_s, end_to_end_peak, stages = _end_to_end(study_zip, settings, backend)
    return StudyResult(
        name=study_zip.name,
        n_files=n_files,
        volume_shape=tuple(shape),
        recorder=recorder,
        reference_max_abs_diff=max_diff,
        end_to_end_s=end_to_end_s,
        end_to_end_peak_mib=end_to_end_peak,
        end_to_end_stages=stages,
    )


def _end_to_end(
    study_zip: Path, settings: Settings, backend: OnnxRuntimeBackend
) -> tuple[float, float, dict[str, float]]:
    """The whole study through ``process_input`` and ``write_reports``, once."""
    with tempfile.TemporaryDirectory(prefix="cts-bench-report-") as output:
        reset_peak_rss()
        start_rss = rss_mib()
        started = time.perf_counter()
        reports = process_input(
            study_zip, backend=backend, settings=settings, display_name=study_zip.name
        )
        write_reports(reports, Path(output))
        seconds = time.perf_counter() - started
        peak = peak_rss_mib() - start_rss
    (report,) = reports
    if report.processing_status is not ProcessingStatus.SUCCESS:
        raise RuntimeError(f"{study_zip.name}: {report.failure_reason}")
    return seconds, peak, dict(report.stage_seconds)

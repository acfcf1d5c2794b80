"""One input (zip, folder or file) in, one StudyReport per study out.

The stages of a study: intake (safe unpacking into a temporary work directory that is
always removed), headers (grouping into studies and series), selection of the series
to analyse, volume (pixel data in patient geometry, data-quality checks), chest check,
preprocessing to the model input, inference, findings.

The work splits in two so that any backend can sit in the middle:

* :func:`prepare_studies` does everything up to the model input and yields one
  :class:`PreparedStudy` per study (a failed study carries its Failure report and no
  input);
* :func:`finish_study` turns the model's outputs into the finished report.

:func:`process_input` chains both around an :class:`InferenceBackend`. Nothing in a
study can crash the run: any error becomes a Failure row with a reason and the next
study goes on. Only :class:`TransientBackendError` (the model server is unreachable)
propagates, because the study itself is fine and the caller should retry it later.

Logs never carry patient identifiers: inputs are named by a short hash.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger

from services.core.chest_check import check_chest
from services.core.config import Settings
from services.core.dicom import geometry
from services.core.dicom.instances import CT_IMAGE_STORAGE
from services.core.dicom.intake import IntakeError, collect_dicom_files
from services.core.dicom.series import read_studies, select_series
from services.core.dicom.volume import SeriesDataError, load_volume
from services.core.findings import (
    Thresholds,
    evaluate_findings,
    most_dangerous_finding,
    pathology_flag,
    resolve_thresholds,
)
from services.core.inference.base import InferenceBackend, ModelOutputs, TransientBackendError
from services.core.model_metadata import ModelMetadata
from services.core.preprocessing import PreprocessingTarget, preprocess_volume, to_model_input
from services.core.schemas import (
    IntakeSummary,
    ModelInfo,
    ProcessingStatus,
    StudyReport,
)

WORK_DIR_PREFIX = "cts-intake-"
ProgressCallback = Callable[[StudyReport], None]


@dataclass
class PreparedStudy:
    """One study ready for the model (or already failed, with ``model_input`` None)."""

    report: StudyReport  # model fields empty until finish_study
    model_input: np.ndarray | None  # float32 [1, 1, D, H, W]
    index: int  # 0-based position of the study within its input
    n_studies: int  # studies found in the input
    shared_seconds: float  # this study's share of the input-wide stages (intake, headers)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.model_input is not None


def preprocessing_target(metadata: ModelMetadata) -> PreprocessingTarget:
    return PreprocessingTarget(
        shape=tuple(metadata.target_shape),  # type: ignore[arg-type]
        spacing_mm=tuple(metadata.target_spacing_mm),  # type: ignore[arg-type]
        hu_window=tuple(metadata.hu_window),  # type: ignore[arg-type]
    )


def log_name(display_name: str) -> str:
    """How logs name an input: a short hash, since file names may hold patient names."""
    return "input-" + hashlib.sha256(display_name.encode("utf-8")).hexdigest()[:10]


def _failure(
    display_name: str,
    reason: str,
    *,
    study_uid: str | None = None,
    intake: IntakeSummary | None = None,
    warnings: list[str] | None = None,
    stage_seconds: dict[str, float] | None = None,
) -> StudyReport:
    stages = dict(stage_seconds or {})
    return StudyReport(
        path_to_study=display_name,
        study_uid=study_uid,
        processing_status=ProcessingStatus.FAILURE,
        time_of_processing=round(sum(stages.values()), 4),
        failure_reason=reason,
        warnings=list(warnings or []),
        intake=intake,
        stage_seconds=stages,
    )


class _StageClock:
    """Times named stages; a failing stage is timed too and named in the failure reason."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.current = name
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(
                self.seconds.get(name, 0.0) + time.perf_counter() - started, 4
            )


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    return text or type(error).__name__


NOT_CHEST_PREFIX = "not a chest CT"


def not_chest_reason(reason: str) -> str:
    """``not a chest CT: <reason>``, without doubling a prefix the check already wrote."""
    reason = reason.strip()
    if reason.lower().startswith(NOT_CHEST_PREFIX.lower()):
        return reason
    return f"{NOT_CHEST_PREFIX}: {reason}"


def header_quality_notes(study: object) -> list[str]:
    """Duplicate slice positions of each axial-image CT series, from the headers alone."""
    notes = []
    for series in getattr(study, "series", []):
        # Localizers and secondary captures (dose screens) share positions by nature.
        image_series = series.sop_class_uid == CT_IMAGE_STORAGE and not (
            {"LOCALIZER", "SCOUT", "TOPOGRAM"} & set(series.image_type)
        )
        if series.modality != "CT" or series.n_images < 2 or not image_series:
            continue
        orientation = series.orientation()
        positions = [inst.position for inst in series.instances if inst.position is not None]
        if orientation is None or len(positions) < 2:
            continue
        normal = geometry.slice_normal(orientation)
        _, duplicates = geometry.sort_and_deduplicate(
            geometry.positions_along(normal, np.stack(positions))
        )
        if duplicates:
            notes.append(
                f"series {series.series_number if series.series_number is not None else '?'}: "
                f"{duplicates} duplicate slice positions among {series.n_images} images"
            )
    return notes


def _prepare_one_study(
    study: object,
    *,
    display_name: str,
    summary: IntakeSummary,
    settings: Settings,
    target: PreprocessingTarget,
    clock: _StageClock,
) -> tuple[StudyReport, np.ndarray | None]:
    """Selection, volume, chest check and preprocessing of one study."""
    study_uid: str = study.study_uid  # type: ignore[attr-defined]
    report = StudyReport(
        path_to_study=display_name,
        study_uid=study_uid,
        processing_status=ProcessingStatus.FAILURE,
        intake=summary,
        warnings=list(summary.problems),
    )
    warnings = report.warnings  # pydantic copied the list: append to the report's own

    with clock.stage("selection"):
        selection = select_series(study, settings.series_selection)
    report.series_decisions = list(selection.decisions)
    if selection.selected is None:
        # No volume will be read, so the data-quality checks of load_volume never run;
        # report what the headers alone show (duplicates explain many short series).
        warnings.extend(header_quality_notes(study))
        report.failure_reason = selection.failure_reason or "no usable series in the study"
        return report, None
    series = selection.selected
    report.series_uid = series.series_uid

    with clock.stage("volume"):
        try:
            volume, quality, volume_warnings = load_volume(
                series, settings.quality, max_voxels=settings.intake.max_series_voxels
            )
        except SeriesDataError as error:
            # The quality findings gathered before the failure explain it: keep them.
            warnings.extend(error.warnings)
            report.failure_reason = _error_text(error)
            return report, None
    report.quality = quality
    warnings.extend(volume_warnings)

    with clock.stage("chest_check"):
        evidence = check_chest(study, series, volume, settings.chest_check)
    report.chest_check = evidence
    if not evidence.is_chest:
        report.failure_reason = not_chest_reason(evidence.reason)
        return report, None

    with clock.stage("preprocessing"):
        model_input = to_model_input(preprocess_volume(volume, target))
    del volume
    return report, model_input


def prepare_studies(
    input_path: Path,
    *,
    settings: Settings,
    target: PreprocessingTarget,
    display_name: str | None = None,
) -> Iterator[PreparedStudy]:
    """Yield every study of one input, up to its model input; at least one item per input.

    The temporary work directory lives while the generator runs and is removed when it
    ends, fails or is closed early.
    """
    input_path = Path(input_path)
    name = display_name or str(input_path)
    tag = log_name(name)
    work_dir = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX))
    try:
        clock = _StageClock()
        try:
            with clock.stage("intake"):
                intake = collect_dicom_files(input_path, work_dir / "files", settings.intake)
            with clock.stage("headers"):
                studies = read_studies(intake.dicom_files, intake.summary)
        except IntakeError as error:
            # The reason names the archive, whose name may hold a patient's: report, not log.
            logger.warning("{}: intake failed (reason in the report)", tag)
            yield PreparedStudy(
                report=_failure(
                    name,
                    f"intake failed: {_error_text(error)}",
                    intake=error.summary,
                    stage_seconds=clock.seconds,
                ),
                model_input=None,
                index=0,
                n_studies=0,
                shared_seconds=sum(clock.seconds.values()),
            )
            return
        except Exception as error:  # noqa: BLE001 - a broken input is a Failure row, not a crash
            logger.exception("{}: reading the input failed", tag)
            yield PreparedStudy(
                report=_failure(
                    name,
                    f"{clock.current or 'intake'} failed: {type(error).__name__}: {_error_text(error)}",
                    stage_seconds=clock.seconds,
                ),
                model_input=None,
                index=0,
                n_studies=0,
                shared_seconds=sum(clock.seconds.values()),
            )
            return

        summary = intake.summary
        shared = dict(clock.seconds)
        if not studies:
            reason = "no readable DICOM image in the input"
            if summary.unreadable_dicom:
                reason += f" ({summary.unreadable_dicom} unreadable DICOM files)"
            yield PreparedStudy(
                report=_failure(
                    name, reason, intake=summary, warnings=summary.problems, stage_seconds=shared
                ),
                model_input=None,
                index=0,
                n_studies=0,
                shared_seconds=sum(shared.values()),
            )
            return

        share = {stage: round(seconds / len(studies), 4) for stage, seconds in shared.items()}
        logger.info("{}: {} studies", tag, len(studies))
        for index, study in enumerate(studies):
            study_clock = _StageClock()
            study_clock.seconds.update(share)
            try:
                report, model_input = _prepare_one_study(
                    study,
                    display_name=name,
                    summary=summary,
                    settings=settings,
                    target=target,
                    clock=study_clock,
                )
            except Exception as error:  # noqa: BLE001 - one broken study must not stop the others
                stage = study_clock.current or "processing"
                logger.warning(
                    "{} study {}: {} failed: {}", tag, index, stage, type(error).__name__
                )
                report = _failure(
                    name,
                    f"{stage} failed: {_error_text(error)}",
                    study_uid=getattr(study, "study_uid", None),
                    intake=summary,
                    warnings=list(summary.problems),
                )
                model_input = None
            report.stage_seconds = dict(study_clock.seconds)
            report.time_of_processing = round(sum(study_clock.seconds.values()), 4)
            if model_input is None:
                # The reason may name files inside the input (patient names): it goes to the
                # report only.
                logger.info("{} study {}: Failure (reason in the report)", tag, index)
            yield PreparedStudy(
                report=report,
                model_input=model_input,
                index=index,
                n_studies=len(studies),
                shared_seconds=sum(share.values()),
                stage_seconds=dict(study_clock.seconds),
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def model_info(metadata: ModelMetadata, backend_name: str) -> ModelInfo:
    return ModelInfo(
        version=metadata.model_version,
        demo=metadata.demo,
        backend=backend_name,
        flavour=metadata.flavour,
        weights=[
            {
                "model": weight.model,
                "path": weight.path,
                "sha256": weight.sha256,
                "source": weight.source,
                "source_sha256": weight.source_sha256,
            }
            for weight in metadata.weights
        ],
    )


def finish_study(
    prepared: PreparedStudy,
    outputs: ModelOutputs,
    *,
    metadata: ModelMetadata,
    thresholds: Thresholds,
    backend_name: str,
    inference_seconds: float,
    row: int = 0,
) -> StudyReport:
    """The finished Success report of a prepared study from row ``row`` of the model outputs."""
    report = prepared.report.model_copy(deep=True)
    started = time.perf_counter()
    probability = float(np.clip(outputs.pathology_probability[row], 0.0, 1.0))
    findings = evaluate_findings(
        [float(p) for p in outputs.finding_probabilities[row]], metadata.labels, thresholds.findings
    )
    report.probability_of_pathology = probability
    report.pathology = pathology_flag(probability, thresholds.pathology)
    report.findings = findings
    report.most_dangerous_pathology_type = most_dangerous_finding(findings, metadata.severity_order)
    report.model = model_info(metadata, backend_name)
    report.demo_weights = metadata.demo
    report.processing_status = ProcessingStatus.SUCCESS
    report.failure_reason = None
    stages = dict(prepared.stage_seconds)
    stages["inference"] = round(inference_seconds, 4)
    stages["findings"] = round(time.perf_counter() - started, 4)
    report.stage_seconds = stages
    report.time_of_processing = round(sum(stages.values()), 4)
    return report


def model_input_file_name(input_name: str, index: int, n_studies: int) -> str:
    """``<input name>.npy``, with ``_<index>`` when the input holds several studies."""
    stem = Path(input_name).name
    for suffix in (".zip", ".dcm"):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "input"
    return f"{stem}_{index}.npy" if n_studies > 1 else f"{stem}.npy"


def process_input(
    input_path: Path,
    *,
    backend: InferenceBackend,
    settings: Settings,
    display_name: str | None = None,
    save_model_input_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> list[StudyReport]:
    """Every study of one input through the whole pipeline; one report per study (>= 1).

    Raises ThresholdError for thresholds that do not fit the model (a configuration
    error) and TransientBackendError when the model server is unreachable.
    """
    metadata = backend.metadata
    thresholds = resolve_thresholds(metadata, settings.inference)
    target = preprocessing_target(metadata)
    name = display_name or str(input_path)
    reports: list[StudyReport] = []
    for prepared in prepare_studies(
        input_path, settings=settings, target=target, display_name=name
    ):
        report = prepared.report
        if prepared.model_input is not None:
            if save_model_input_dir is not None:
                save_model_input_dir.mkdir(parents=True, exist_ok=True)
                file_name = model_input_file_name(
                    Path(input_path).name, prepared.index, prepared.n_studies
                )
                np.save(save_model_input_dir / file_name, prepared.model_input)
            report = _infer_and_finish(prepared, backend, metadata, thresholds)
            prepared.model_input = None  # the 221 MB input is not needed any more
        logger.info(
            "{} study {}: {} in {:.2f} s",
            log_name(name),
            prepared.index,
            report.processing_status.value,
            report.time_of_processing,
        )
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports


def _infer_and_finish(
    prepared: PreparedStudy,
    backend: InferenceBackend,
    metadata: ModelMetadata,
    thresholds: Thresholds,
) -> StudyReport:
    started = time.perf_counter()
    try:
        outputs = backend.infer(prepared.model_input)  # type: ignore[arg-type]
        return finish_study(
            prepared,
            outputs,
            metadata=metadata,
            thresholds=thresholds,
            backend_name=backend.name,
            inference_seconds=time.perf_counter() - started,
        )
    except TransientBackendError:
        raise
    except Exception as error:  # noqa: BLE001 - a model error fails this study only
        logger.exception("inference failed")
        report = prepared.report.model_copy(deep=True)
        report.failure_reason = f"inference failed: {_error_text(error)}"
        report.stage_seconds = {
            **prepared.stage_seconds,
            "inference": round(time.perf_counter() - started, 4),
        }
        report.time_of_processing = round(sum(report.stage_seconds.values()), 4)
        return report

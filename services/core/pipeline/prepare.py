"""Everything of one input up to the model input: intake, headers, and per study the series
selection, volume, chest check and preprocessing (docs/ARCHITECTURE.md, "A study's path").

The temporary work directory of an input lives while :func:`prepare_studies` runs and is
always removed. Logs never carry patient identifiers: inputs are named by a short hash.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from services.core.arrays import ModelInput
from services.core.chest_check import BodyPartRegressionModel, check_chest
from services.core.config import Settings
from services.core.dicom.headers import read_studies
from services.core.dicom.objects import Series, Study
from services.core.dicom.series_selection import select_series
from services.core.dicom.study_identity import patient_identity, study_identity
from services.core.dicom.volume_builder import header_duplicate_notes, load_volume
from services.core.errors import (
    ErrorPolicy,
    IntakeError,
    ScreeningError,
    StudyError,
    policy_of,
    reason_of,
)
from services.core.intake import NiftiFile, collect_dicom_files
from services.core.intake.kept import kept_intake
from services.core.model_metadata import ModelMetadata
from services.core.nifti.study import prepare_nifti_study
from services.core.pipeline.events import NO_EVENTS, PipelineEvents, StageClock
from services.core.pipeline.failures import failure_report, not_chest_reason
from services.core.preprocessing import PreprocessingTarget, preprocess_volume, to_model_input
from services.core.quality import QualityFlag
from services.core.schemas import FailureKind, IntakeSummary, ProcessingStatus, StudyReport

WORK_DIR_PREFIX = "cts-intake-"


@dataclass
class PreparedStudy:
    """One study ready for the model (or already failed, with ``model_input`` None)."""

    report: StudyReport  # model fields empty until finish_study
    model_input: ModelInput | None  # float32 [1, 1, D, H, W]
    index: int  # 0-based position of the study within its input
    n_studies: int  # studies found in the input
    shared_seconds: float  # this study's share of the input-wide stages (intake, headers)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.model_input is not None


@dataclass(frozen=True)
class CheckFirst:
    """Check each study only as far as is cheap, then stop before the costly work (the
    adapter asks this while other tasks wait: their refusals should not wait behind this
    task's preparation). A CT series of at most ``max_checked_voxels`` gets its volume and
    chest check now, so a small study that is not a chest is refused here; a larger one
    stops after its headers. Other modalities always go on: the first verdict rule refuses
    them without a costly step. A NIfTI volume (read whole to know what it is) stops after
    its chest check."""

    max_checked_voxels: int


class PreparationDeferred(ScreeningError):
    """A study passed the checks of :class:`CheckFirst`: its full preparation comes later.
    Ends :func:`prepare_studies` (its work directory is removed); not a failure."""

    policy = ErrorPolicy.RETRY_LATER


def _defer_nifti() -> None:
    raise PreparationDeferred("a chest CT volume: its preprocessing comes with its preparation")


def series_voxels(series: Series) -> int:
    """Voxels of a series from its headers: images x rows x columns (x frames)."""
    header = series.first_header
    frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    rows = int(getattr(header, "Rows", 0) or 0)
    columns = int(getattr(header, "Columns", 0) or 0)
    return series.n_images * frames * rows * columns


def preprocessing_target(metadata: ModelMetadata) -> PreprocessingTarget:
    return PreprocessingTarget(
        shape=metadata.target_shape,
        spacing_mm=metadata.target_spacing_mm,
        hu_window=metadata.hu_window,
    )


def log_name(display_name: str) -> str:
    """How logs name an input: a short hash, since file names may hold patient names."""
    return "input-" + hashlib.sha256(display_name.encode("utf-8")).hexdigest()[:10]


def prepare_studies(
    input_path: Path,
    *,
    settings: Settings,
    target: PreprocessingTarget,
    display_name: str | None = None,
    events: PipelineEvents = NO_EVENTS,
    body_part_model: BodyPartRegressionModel | None = None,
    check_first: CheckFirst | None = None,
    kept_intake_dir: Path | None = None,
) -> Iterator[PreparedStudy]:
    """Yield every study of one input, up to its model input; at least one item per input.

    ``body_part_model`` is the backend's body-part regression network for the chest check
    (None: tags and lung_air only). With ``check_first``, the first DICOM study that passes
    its cheap checks raises :class:`PreparationDeferred`. ``kept_intake_dir``: the input is
    unpacked there and kept (services/core/intake/kept.py), or an intake kept there before
    is used. Errors whose policy is not FAILURE_ROW (services/core/errors.py) propagate.
    """
    input_path = Path(input_path)
    name = display_name or str(input_path)
    tag = log_name(name)
    work_dir = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX))
    try:
        clock = StageClock(events)
        try:
            with clock.stage("intake"):
                intake = (
                    collect_dicom_files(input_path, work_dir / "files", settings.intake)
                    if kept_intake_dir is None
                    else kept_intake(input_path, kept_intake_dir, settings.intake)
                )
            with clock.stage("headers"):
                dicom_studies = read_studies(intake.dicom_files, intake.summary)
            # Each NIfTI file is one study of its own (services/core/nifti/study.py).
            studies: list[Study | NiftiFile] = [*dicom_studies, *intake.nifti_files]
        except IntakeError as error:
            # The reason names the archive, whose name may hold a patient's: report, not log.
            logger.warning("{}: intake failed (reason in the report)", tag)
            report = failure_report(
                name,
                f"intake failed: {reason_of(error)}",
                intake=error.summary,
                stage_seconds=clock.seconds,
            )
            yield _input_failure(report, clock)
            return
        except Exception as error:
            if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
                raise
            logger.exception("{}: reading the input failed", tag)
            reason = f"{clock.current or 'intake'} failed: {type(error).__name__}: {error}"
            yield _input_failure(failure_report(name, reason, stage_seconds=clock.seconds), clock)
            return

        summary = intake.summary
        if not studies:
            reason = "no readable DICOM image in the input"
            if summary.unreadable_dicom:
                reason += f" ({summary.unreadable_dicom} unreadable DICOM files)"
            report = failure_report(
                name,
                reason,
                intake=summary,
                warnings=summary.problems,
                stage_seconds=clock.seconds,
            )
            yield _input_failure(report, clock)
            return

        share = {
            stage: round(seconds / len(studies), 4) for stage, seconds in clock.seconds.items()
        }
        logger.info("{}: {} studies", tag, len(studies))
        for index, study in enumerate(studies):
            study_clock = StageClock(
                events, study_index=index, n_studies=len(studies), seconds=share
            )
            try:
                report, model_input = _prepare_one_study(
                    study,
                    display_name=name,
                    summary=summary,
                    settings=settings,
                    target=target,
                    clock=study_clock,
                    body_part_model=body_part_model,
                    check_first=check_first,
                )
            except Exception as error:
                if policy_of(error) is not ErrorPolicy.FAILURE_ROW:
                    raise
                stage = study_clock.current or "processing"
                logger.warning(
                    "{} study {}: {} failed: {}", tag, index, stage, type(error).__name__
                )
                report = failure_report(
                    name,
                    f"{stage} failed: {reason_of_study_error(error)}",
                    study_uid=study.study_uid,
                    intake=summary,
                    warnings=list(summary.problems),
                )
                model_input = None
            report.stage_seconds = dict(study_clock.seconds)
            report.time_of_processing = study_clock.total
            if model_input is None:
                # The reason may name files inside the input (patient names): report only.
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


def reason_of_study_error(error: BaseException) -> str:
    """The text after "<stage> failed: " for an error inside one study."""
    return str(error).strip() or type(error).__name__


def _input_failure(report: StudyReport, clock: StageClock) -> PreparedStudy:
    """The one item of an input that has no usable study."""
    return PreparedStudy(
        report=report, model_input=None, index=0, n_studies=0, shared_seconds=clock.total
    )


def _prepare_one_study(
    study: Study | NiftiFile,
    *,
    display_name: str,
    summary: IntakeSummary,
    settings: Settings,
    target: PreprocessingTarget,
    clock: StageClock,
    body_part_model: BodyPartRegressionModel | None = None,
    check_first: CheckFirst | None = None,
) -> tuple[StudyReport, ModelInput | None]:
    """Selection, volume, chest check and preprocessing of one study."""
    if isinstance(study, NiftiFile):
        return prepare_nifti_study(
            study,
            display_name=display_name,
            summary=summary,
            settings=settings,
            target=target,
            clock=clock,
            body_part_model=body_part_model,
            before_preprocessing=None if check_first is None else _defer_nifti,
        )
    report = StudyReport(
        path_to_study=display_name,
        study_uid=study.study_uid,
        processing_status=ProcessingStatus.FAILURE,
        intake=summary,
        warnings=list(summary.problems),
    )
    warnings = report.warnings  # pydantic copied the list: append to the report's own

    with clock.stage("selection"):
        selection = select_series(study, settings.series_selection)
    report.series_decisions = list(selection.decisions)
    clock.events.series_selected(
        study, selection.selected, study_index=clock.study_index, n_studies=clock.n_studies
    )
    shown = selection.selected or (study.series[0] if study.series else None)
    header = shown.first_header if shown else None
    for key, value in study_identity(header).items():
        setattr(report, key, value)
    report.identity = patient_identity(header)
    if selection.selected is None:
        # No volume will be read, so the data-quality checks of load_volume never run;
        # report what the headers alone show (duplicates explain many short series).
        warnings.extend(header_duplicate_notes(study))
        report.failure_reason = selection.failure_reason or "no usable series in the study"
        report.failure_kind = FailureKind.NOT_ANALYSED  # nothing in it is a CT volume
        return report, None
    series = selection.selected
    report.series_uid = series.series_uid
    if selection.usable > 1:
        # Another usable series may show what this one does not: the reader should know.
        number = series.series_number if series.series_number is not None else "?"
        warnings.append(
            f"{selection.usable} usable series in the study: series {number} was read "
            "(the series list says why)"
        )
        report.quality_flags.append(QualityFlag.SERIES_CHOSEN)
    if (
        check_first is not None
        and series.modality == "CT"
        and series_voxels(series) > check_first.max_checked_voxels
    ):
        raise PreparationDeferred("a large CT series: its volume comes with its preparation")

    with clock.stage("volume"):
        try:
            volume, quality, volume_warnings = load_volume(
                series, settings.quality, max_voxels=settings.intake.max_series_voxels
            )
        except StudyError as error:
            # The quality findings gathered before the failure explain it: keep them.
            warnings.extend(error.warnings)
            report.failure_reason = reason_of(error)
            report.failure_kind = FailureKind.FAILED  # the series is there but cannot be read
            return report, None
    report.quality = quality
    warnings.extend(volume_warnings)
    report.quality_flags.extend(quality.flags)
    clock.events.volume_loaded(volume, study_index=clock.study_index, n_studies=clock.n_studies)

    with clock.stage("chest_check"):
        evidence = check_chest(
            study, series, volume, settings.chest_check, body_part_model=body_part_model
        )
    report.chest_check = evidence
    warnings.extend(evidence.warnings)
    if not evidence.is_chest:
        report.failure_reason = not_chest_reason(evidence.reason)
        report.failure_kind = FailureKind.NOT_ANALYSED
        return report, None
    if check_first is not None:
        raise PreparationDeferred("a chest CT: its preprocessing comes with its preparation")

    with clock.stage("preprocessing"):
        model_input = to_model_input(preprocess_volume(volume, target))
    del volume
    return report, model_input

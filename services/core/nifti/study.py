"""One NIfTI file as one study: volume, chest check by image, model input.

A NIfTI carries no DICOM tags, so the checks that read them (series selection, modality,
body part and descriptions, rescale tags, slice-by-slice positions) are reported as not
applicable, and the image-based chest check decides alone (with the coverage rule, which
needs only the geometry). The study and series UIDs are derived from the file's name within
its input and its header, so that they are stable from run to run (``training embed``
resumes by them) and differ between files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.core.arrays import ModelInput
from services.core.body_part.bpr_detector import BodyPartRegressionModel
from services.core.body_part.detectors import create_detector
from services.core.chest_check import (
    MetadataAssessment,
    body_part_regression_evidence,
    decide_by_regression,
    regression_decides,
)
from services.core.config import ChestCheckSettings, Settings
from services.core.intake.collect import NiftiFile
from services.core.nifti.ct_rate import (
    CtRateVolumeInfo,
    ct_rate_volume,
    read_ct_rate_metadata,
    volume_key,
)
from services.core.nifti.reader import (
    NiftiVolume,
    checked_shape,
    load_nifti_volume,
    read_header,
    read_scaled_data,
)
from services.core.preprocessing import PreprocessingTarget, preprocess_volume, to_model_input
from services.core.schemas import (
    ChestCheckEvidence,
    FailureKind,
    IntakeSummary,
    ProcessingStatus,
    QualityReport,
    SeriesDecision,
    StudyReport,
)
from services.core.volume import Volume

if TYPE_CHECKING:
    from services.core.pipeline.events import StageClock

# DICOM UIDs under the 2.25 root are decimal forms of a 128-bit number (ITU-T X.667).
UUID_ROOT = "2.25."
UID_BYTES = 16
TAGS_NOT_APPLICABLE = (
    "not applicable: a NIfTI carries no DICOM tags (modality, body part, descriptions)"
)


def nifti_uid(label: str, header_bytes: bytes) -> str:
    digest = hashlib.sha256(label.encode("utf-8") + b"\0" + header_bytes).digest()
    return UUID_ROOT + str(int.from_bytes(digest[:UID_BYTES], "big"))


def prepare_nifti_study(
    nifti: NiftiFile,
    *,
    display_name: str,
    summary: IntakeSummary,
    settings: Settings,
    target: PreprocessingTarget,
    clock: StageClock,
    body_part_model: BodyPartRegressionModel | None = None,
    before_preprocessing: Callable[[], None] | None = None,
) -> tuple[StudyReport, ModelInput | None]:
    """The report so far and the model input of one NIfTI (None when the study failed).
    ``before_preprocessing`` is called once the study passed its chest check (it may raise:
    the pipeline's check first stops there)."""
    report = StudyReport(
        path_to_study=display_name,
        processing_status=ProcessingStatus.FAILURE,
        intake=summary,
        warnings=list(summary.problems),
    )
    with clock.stage("selection"):
        header = read_header(nifti.path)
        uid = nifti_uid(nifti.label, bytes(header.binaryblock))
        report.study_uid = report.series_uid = uid
        ct_rate = _ct_rate_info(nifti, settings)
    with clock.stage("volume"):
        loaded = _load(nifti, ct_rate, settings)
    volume = loaded.volume
    report.warnings.extend(loaded.warnings)
    report.series_decisions = [_decision(nifti, uid, loaded)]
    report.quality = _quality(loaded)

    with clock.stage("chest_check"):
        evidence = check_chest_by_image(volume, settings.chest_check, body_part_model)
    report.chest_check = evidence
    report.warnings.extend(evidence.warnings)
    if not evidence.is_chest:
        report.failure_reason = evidence.reason  # starts with "not a chest CT", as everywhere
        report.failure_kind = FailureKind.NOT_ANALYSED
        return report, None
    if before_preprocessing is not None:
        before_preprocessing()

    with clock.stage("preprocessing"):
        model_input = to_model_input(preprocess_volume(volume, target))
    return report, model_input


def _ct_rate_info(nifti: NiftiFile, settings: Settings) -> CtRateVolumeInfo | None:
    csv_path = settings.intake.ct_rate_metadata
    if csv_path is None:
        return None
    return read_ct_rate_metadata(csv_path).get(volume_key(nifti.name))


def _load(nifti: NiftiFile, ct_rate: CtRateVolumeInfo | None, settings: Settings) -> NiftiVolume:
    max_voxels = settings.intake.max_series_voxels
    if ct_rate is None:
        return load_nifti_volume(nifti.path, max_voxels=max_voxels)
    header = read_header(nifti.path)
    checked_shape(header, max_voxels)
    volume = ct_rate_volume(read_scaled_data(nifti.path, header), ct_rate)
    return NiftiVolume(
        volume=volume,
        geometry_source=(
            "CT-RATE metadata: slope, intercept and spacing from the CSV, affine ignored "
            "(CT-CLIP's loader)"
        ),
        shear_degrees=0.0,
        data_type=str(header.get_data_dtype()),
    )


def _decision(nifti: NiftiFile, uid: str, loaded: NiftiVolume) -> SeriesDecision:
    slices, rows, columns = loaded.volume.shape
    return SeriesDecision(
        series_uid=uid,
        description=nifti.label,
        modality="",
        n_images=slices,
        selected=True,
        reason=(
            f"NIfTI volume {slices}x{rows}x{columns} ({loaded.data_type}), geometry from the "
            f"{loaded.geometry_source}; one volume is one study, the DICOM series rules are "
            "not applicable"
        ),
    )


def _quality(loaded: NiftiVolume) -> QualityReport:
    volume = loaded.volume
    slices, rows, columns = volume.shape
    slice_spacing, row_spacing, column_spacing = volume.spacing_mm
    return QualityReport(
        n_slices=slices,
        rows=rows,
        columns=columns,
        slice_spacing_mm=round(slice_spacing, 4),
        pixel_spacing_mm=(round(row_spacing, 4), round(column_spacing, 4)),
        coverage_mm=round((slices - 1) * slice_spacing, 2),
        expected_slices=slices,
        spacing_min_mm=round(slice_spacing, 4),
        spacing_max_mm=round(slice_spacing, 4),
        gantry_tilt_degrees=round(loaded.shear_degrees, 2),
    )


def check_chest_by_image(
    volume: Volume,
    settings: ChestCheckSettings,
    body_part_model: BodyPartRegressionModel | None = None,
) -> ChestCheckEvidence:
    """The chest check without tags: coverage along the body axis, the image detector and,
    when the backend serves one, body-part regression (which decides with real weights)."""
    detector = create_detector(settings)
    image = detector.assess(volume)
    regression, regression_warnings = body_part_regression_evidence(
        volume, settings, body_part_model
    )
    coverage_mm = float(volume.extent_mm[0])
    if coverage_mm < settings.min_coverage_mm:
        is_chest, reason = (
            False,
            (
                f"not a chest CT: the volume covers {coverage_mm:.0f} mm along the body axis, less "
                f"than the {settings.min_coverage_mm:.0f} mm a chest needs; images: {image.summary}"
            ),
        )
    elif regression_decides(regression):
        assert regression is not None
        no_tags = MetadataAssessment(verdict=None, evidence=[TAGS_NOT_APPLICABLE])
        is_chest, reason = decide_by_regression(no_tags, image, regression)
    elif not image.is_chest:
        is_chest, reason = (
            False,
            (f"not a chest CT: the images do not show lungs across the volume ({image.summary})"),
        )
    else:
        is_chest, reason = (
            True,
            (f"chest CT by image: {image.summary}; the tag checks are not applicable (NIfTI)"),
        )
    return ChestCheckEvidence(
        is_chest=is_chest,
        reason=reason,
        metadata_verdict=None,
        metadata_evidence=[TAGS_NOT_APPLICABLE],
        image_verdict=image.is_chest,
        image_detector=detector.name,
        image_evidence={"summary": image.summary, **image.evidence},
        coverage_mm=round(coverage_mm, 1),
        body_part_regression=regression,
        body_part_regression_decides=regression_decides(regression),
        warnings=regression_warnings,
    )

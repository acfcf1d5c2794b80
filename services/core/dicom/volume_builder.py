"""From the selected series to a Volume in Hounsfield units, with its data-quality report.

Memory: the output is one preallocated float32 array; pixel data is decoded one file at a
time and released, so a 1000-slice 512x512 series needs about 1 GiB for the volume plus a
few slices, never all the data sets at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from loguru import logger
from pydicom.uid import CTImageStorage

from services.core.arrays import Float64Array, LpsVector, Orientation
from services.core.config import QualitySettings
from services.core.dicom import geometry
from services.core.dicom.objects import Instance, Series, Study
from services.core.dicom.pixel_data import read_hu, transfer_syntax_name
from services.core.dicom.values import float_or_none, int_or_none, tag_value
from services.core.errors import SeriesDataError
from services.core.quality import QualityFlag
from services.core.schemas import QualityReport
from services.core.volume import Volume

PIXEL_SPACING_TOLERANCE = 1e-3  # relative
TILT_WARNING_DEGREES = 0.5


@dataclass(frozen=True)
class _SeriesGeometry:
    row_cosine: LpsVector
    column_cosine: LpsVector
    normal: LpsVector
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    image_positions: Float64Array  # [n, 3] ImagePositionPatient of every instance, in order


def load_volume(
    series: Series, settings: QualitySettings, *, max_voxels: int | None = None
) -> tuple[Volume, QualityReport, list[str]]:
    """Read, order and check the slices of ``series``; HU volume, quality report, warnings.

    Raises SeriesDataError when the series cannot be a volume: missing geometry tags, mixed
    orientations or image sizes, too many missing slices, too much gantry tilt, pixel data
    that cannot be decoded, or a volume of more than ``max_voxels`` voxels
    (intake.max_series_voxels), which is decided from the headers before any pixel is read.
    """
    instances = series.instances
    if len(instances) < 2:
        raise SeriesDataError(f"the series has {len(instances)} image(s): not a volume")
    shared = _shared_geometry(instances)
    positions = geometry.positions_along(shared.normal, shared.image_positions)
    tie_breakers = [
        (inst.instance_number if inst.instance_number is not None else 1 << 30, str(inst.path))
        for inst in instances
    ]
    hints = [
        float_or_none(tag_value(instances[0].header, "SpacingBetweenSlices")),
        series.slice_thickness,
    ]
    stack = geometry.analyse_stack(
        positions, settings.spacing_tolerance_fraction, hints, tie_breakers
    )
    if stack.n_slices < 2:
        raise SeriesDataError(f"all {len(instances)} images share one slice position: not a volume")
    kept = [instances[i] for i in stack.order]
    tilt = geometry.stacking_tilt_degrees(kept[0].position, kept[-1].position, shared.normal)
    tilt_tag = float_or_none(tag_value(kept[0].header, "GantryDetectorTilt"))

    warnings, flags = _quality_warnings(series, stack, tilt, tilt_tag, len(instances))
    too_large = series_size_error(
        shared.rows, shared.columns, max(stack.n_slices, stack.expected_slices), max_voxels
    )
    if too_large:
        raise SeriesDataError(too_large, warnings=warnings)
    if stack.missing_percent > settings.max_missing_slices_percent:
        raise SeriesDataError(
            f"{stack.missing_slices} of {stack.expected_slices} slice positions are missing "
            f"({stack.missing_percent:.1f}% > {settings.max_missing_slices_percent:g}% allowed; "
            f"nominal spacing {stack.spacing_mm:.2f} mm)",
            warnings=warnings,
        )
    if tilt > settings.max_gantry_tilt_degrees:
        raise SeriesDataError(
            f"gantry tilt {tilt:.1f} degrees exceeds the {settings.max_gantry_tilt_degrees:g} "
            "degrees allowed",
            warnings=warnings,
        )

    hu, rescale_missing = read_hu(kept, stack, shared.rows, shared.columns)
    if rescale_missing:
        warnings.append(
            f"RescaleSlope/RescaleIntercept missing or invalid on {rescale_missing} of {len(kept)} "
            "images: "
            "assumed slope 1 and intercept 0 (values may not be Hounsfield units)"
        )
    spacing = stack.grid_spacing_mm
    interpolated = geometry.interpolated_indices(stack)
    volume = Volume(
        hu=hu,
        row_cosine=shared.row_cosine,
        column_cosine=shared.column_cosine,
        slice_normal=shared.normal,
        spacing_mm=(float(spacing), shared.pixel_spacing[0], shared.pixel_spacing[1]),
        origin_mm=np.asarray(kept[0].position, dtype=np.float64),
        interpolated_slices=tuple(interpolated),
    )
    header = kept[0].header
    report = QualityReport(
        n_slices=stack.n_slices,
        rows=shared.rows,
        columns=shared.columns,
        slice_spacing_mm=round(float(spacing), 4),
        pixel_spacing_mm=shared.pixel_spacing,
        slice_thickness_mm=series.slice_thickness,
        coverage_mm=round(stack.coverage_mm, 2),
        expected_slices=stack.expected_slices,
        missing_slices=stack.missing_slices,
        missing_slices_percent=round(stack.missing_percent, 2),
        duplicate_positions=stack.duplicate_positions,
        spacing_min_mm=round(float(stack.gaps_mm.min()), 4),
        spacing_max_mm=round(float(stack.gaps_mm.max()), 4),
        uneven_spacing=stack.uneven,
        gantry_tilt_degrees=round(max(tilt, abs(tilt_tag or 0.0)), 2),
        patient_position=series.patient_position or None,
        convolution_kernel=series.convolution_kernel or None,
        transfer_syntax=transfer_syntax_name(header),
        flags=flags,
        interpolated_slices=interpolated,
    )
    logger.info(
        "volume {} from {} images: spacing {:.2f} mm, {} warnings",
        hu.shape,
        len(instances),
        spacing,
        len(warnings),
    )
    return volume, report, warnings


def series_size_error(rows: int, columns: int, slices: int, max_voxels: int | None) -> str | None:
    """The reason to refuse a rows x columns x slices volume above ``max_voxels``, or None.

    The float32 volume and its preprocessing copies grow with the voxel count; one huge
    series (thousands of thin slices) must fail with a reason rather than exhaust a worker.
    """
    voxels = rows * columns * slices
    if max_voxels is None or voxels <= max_voxels:
        return None
    return (
        f"the series is too large: {rows}x{columns} pixels x {slices} slices = "
        f"{voxels:,} voxels, above the {max_voxels:,} limit (intake.max_series_voxels)"
    )


GEOMETRY_TAGS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
PERPENDICULAR_TOLERANCE = 1e-2  # |row . column| beyond this: not an orthonormal orientation


def _shared_geometry(instances: list[Instance]) -> _SeriesGeometry:
    """Check that every image shares orientation, size and pixel spacing; return them."""
    for tag in GEOMETRY_TAGS:
        count = sum(1 for inst in instances if tag not in inst.header)
        if count:
            raise SeriesDataError(f"{count} of {len(instances)} images lack {tag}")
    positions: list[LpsVector] = []
    orientations: list[Orientation] = []
    for inst in instances:
        if inst.position is None or inst.orientation is None:
            raise SeriesDataError(
                f"invalid ImagePositionPatient/ImageOrientationPatient in {inst.path.name}"
            )
        positions.append(inst.position)
        orientations.append(inst.orientation)
    reference = _common_orientation(np.stack(orientations))
    row_cosine, column_cosine, normal = _orientation_axes(reference)
    rows, columns = _image_size(instances)
    return _SeriesGeometry(
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        normal=normal,
        rows=rows,
        columns=columns,
        pixel_spacing=_pixel_spacing(instances),
        image_positions=np.stack(positions),
    )


def _common_orientation(orientations: Float64Array) -> Orientation:
    """The orientation every image shares (within tolerance), or SeriesDataError."""
    reference = geometry.most_common_orientation(orientations)
    differs = np.any(np.abs(orientations - reference) > geometry.ORIENTATION_TOLERANCE, axis=1)
    if differs.any():
        raise SeriesDataError(
            f"mixed orientations in one series: {int(differs.sum())} of {len(orientations)} "
            "images are not parallel to the others"
        )
    return reference


def _orientation_axes(reference: Orientation) -> tuple[LpsVector, LpsVector, LpsVector]:
    """Row and column direction cosines and the slice normal of an orientation."""
    try:
        row_cosine = geometry.unit(reference[:3])
        column_cosine = geometry.unit(reference[3:])
        normal = geometry.slice_normal(reference)
    except ValueError as error:
        raise SeriesDataError(f"invalid ImageOrientationPatient: {error}") from error
    if abs(float(np.dot(row_cosine, column_cosine))) > PERPENDICULAR_TOLERANCE:
        raise SeriesDataError(
            "invalid ImageOrientationPatient: row and column are not perpendicular"
        )
    return row_cosine, column_cosine, normal


def _image_size(instances: list[Instance]) -> tuple[int, int]:
    """Rows and columns, the same for every image."""
    sizes = {
        (
            int_or_none(tag_value(inst.header, "Rows")),
            int_or_none(tag_value(inst.header, "Columns")),
        )
        for inst in instances
    }  # read_studies drops files whose Rows/Columns cannot be read
    if len(sizes) > 1:
        listed = ", ".join(
            f"{r}x{c}" for r, c in sorted(sizes, key=lambda rc: (rc[0] or 0, rc[1] or 0))
        )
        raise SeriesDataError(f"mixed image sizes in one series: {listed}")
    rows, columns = next(iter(sizes))
    if rows is None or columns is None:
        raise SeriesDataError("invalid Rows/Columns")
    return rows, columns


def _pixel_spacing(instances: list[Instance]) -> tuple[float, float]:
    """PixelSpacing (row, column) in mm, the same for every image."""
    try:
        spacings = np.asarray(
            [_numbers(tag_value(inst.header, "PixelSpacing")) for inst in instances],
            dtype=np.float64,
        )
    except (TypeError, ValueError) as error:
        raise SeriesDataError(f"invalid PixelSpacing: {error}") from error
    if (
        spacings.ndim != 2
        or spacings.shape[1] != 2
        or not np.all(np.isfinite(spacings) & (spacings > 0))
    ):
        raise SeriesDataError("invalid PixelSpacing: expected two positive numbers")
    if np.any(np.abs(spacings - spacings[0]) > PIXEL_SPACING_TOLERANCE * spacings[0]):
        raise SeriesDataError("mixed pixel spacings in one series")
    return float(spacings[0, 0]), float(spacings[0, 1])


def _numbers(value: object) -> list[float]:
    """The numbers of a multi-valued element; TypeError/ValueError when it holds none."""
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes)):
        raise TypeError(f"expected numbers, got {value!r}")
    return [float(item) for item in value]


def _quality_warnings(
    series: Series,
    stack: geometry.StackAnalysis,
    tilt: float,
    tilt_tag: float | None,
    n_images: int,
) -> tuple[list[str], list[QualityFlag]]:
    """The warnings in words and, beside each that a reader should see at a glance, its
    flag (services/core/quality.py)."""
    warnings: list[str] = []
    flags: list[QualityFlag] = []
    if series.series_uid_missing:
        warnings.append("the images have no SeriesInstanceUID: a derived identifier is reported")
    if stack.duplicate_positions:
        warnings.append(
            f"{stack.duplicate_positions} duplicate slice positions: kept one image per position "
            f"({stack.n_slices} of {n_images} images used)"
        )
    if stack.missing_slices:
        flags.append(QualityFlag.INTERPOLATED)
        warnings.append(
            f"{stack.missing_slices} missing slices ({stack.missing_percent:.1f}% of "
            f"{stack.expected_slices} expected positions at {stack.spacing_mm:.2f} mm): "
            "filled by linear interpolation between neighbours"
        )
    if stack.uneven:
        flags.append(QualityFlag.UNEVEN_SPACING)
        warnings.append(
            f"uneven slice spacing: {stack.uneven_gaps} gaps off the nominal "
            f"{stack.spacing_mm:.2f} mm (range {stack.gaps_mm.min():.2f}-"
            f"{stack.gaps_mm.max():.2f} mm): resampled to a regular {stack.spacing_mm:.2f} mm grid"
        )
    if tilt > TILT_WARNING_DEGREES or abs(tilt_tag or 0.0) > TILT_WARNING_DEGREES:
        tag_text = (
            f"; GantryDetectorTilt tag {tilt_tag:+.1f} degrees" if tilt_tag is not None else ""
        )
        flags.append(QualityFlag.GANTRY_TILT)
        warnings.append(
            f"gantry tilt: the slices stack at {tilt:.1f} degrees to their normal{tag_text}; "
            "the volume is sheared by that angle (not corrected)"
        )
    return warnings, flags


def header_duplicate_notes(study: Study) -> list[str]:
    """Duplicate slice positions of each axial-image CT series, from the headers alone.

    Used when no series was selected (no volume is read, so load_volume's checks never
    run): duplicates explain many series that look too short.
    """
    notes = []
    for series in study.series:
        # Localizers and secondary captures (dose screens) share positions by nature.
        image_series = series.sop_class_uid == CTImageStorage and not series.is_localizer
        if series.modality != "CT" or series.n_images < 2 or not image_series:
            continue
        positions = series.positions_along_normal()
        if positions is None or positions.size < 2:
            continue
        _, duplicates = geometry.sort_and_deduplicate(positions)
        if duplicates:
            number = series.series_number if series.series_number is not None else "?"
            notes.append(
                f"series {number}: {duplicates} duplicate slice positions among "
                f"{series.n_images} images"
            )
    return notes

"""From the selected series to a Volume in Hounsfield units, with its data-quality report.

Memory: the output is one preallocated float32 array; pixel data is decoded one file at a
time and released, so a 1000-slice 512x512 series needs about 1 GiB for the volume plus a
few slices, never all the data sets at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pydicom
from loguru import logger
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.core.config import QualitySettings
from services.core.dicom import geometry
from services.core.dicom.instances import Instance, Series, tag_value
from services.core.schemas import QualityReport
from services.core.volume import Volume

ORIENTATION_TOLERANCE = 1e-3  # per IOP component: beyond this two images are not parallel
PIXEL_SPACING_TOLERANCE = 1e-3  # relative
TILT_WARNING_DEGREES = 0.5
# Uncompressed little-endian transfer syntaxes (UID -> implicit VR), read without pydicom.
NATIVE_LITTLE_ENDIAN_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}
PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


class SeriesDataError(Exception):
    """The selected series cannot become a volume; ``str(error)`` is the reason.

    ``warnings`` holds the data-quality findings gathered before the failure, so that a
    failure report can still show them (e.g. duplicates found next to the missing slices).
    """

    def __init__(self, reason: str, warnings: list[str] | None = None) -> None:
        super().__init__(reason)
        self.warnings = list(warnings or [])


@dataclass(frozen=True)
class _SeriesGeometry:
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    normal: np.ndarray
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns)


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
    image_positions = np.stack([inst.position for inst in instances])  # checked in _shared_geometry
    positions = geometry.positions_along(shared.normal, image_positions)
    tie_breakers = [
        (inst.instance_number if inst.instance_number is not None else 1 << 30, str(inst.path))
        for inst in instances
    ]
    hints = [
        _float(tag_value(instances[0].header, "SpacingBetweenSlices")),
        series.slice_thickness,
    ]
    stack = geometry.analyse_stack(
        positions, settings.spacing_tolerance_fraction, hints, tie_breakers
    )
    if stack.n_slices < 2:
        raise SeriesDataError(f"all {len(instances)} images share one slice position: not a volume")
    kept = [instances[i] for i in stack.order]
    tilt = geometry.stacking_tilt_degrees(kept[0].position, kept[-1].position, shared.normal)
    tilt_tag = _float(tag_value(kept[0].header, "GantryDetectorTilt"))

    warnings = _quality_warnings(series, stack, tilt, tilt_tag, len(instances))
    too_large = series_size_error(
        shared.rows, shared.columns, max(stack.n_slices, stack.expected_slices), max_voxels
    )
    if too_large:
        raise SeriesDataError(too_large, warnings)
    if stack.missing_percent > settings.max_missing_slices_percent:
        raise SeriesDataError(
            f"{stack.missing_slices} of {stack.expected_slices} slice positions are missing "
            f"({stack.missing_percent:.1f}% > {settings.max_missing_slices_percent:g}% allowed; "
            f"nominal spacing {stack.spacing_mm:.2f} mm)",
            warnings,
        )
    if tilt > settings.max_gantry_tilt_degrees:
        raise SeriesDataError(
            f"gantry tilt {tilt:.1f} degrees exceeds the {settings.max_gantry_tilt_degrees:g} "
            "degrees allowed",
            warnings,
        )

    hu, rescale_missing = _read_hu(kept, stack, shared)
    if rescale_missing:
        warnings.append(
            f"RescaleSlope/RescaleIntercept missing or invalid on {rescale_missing} of {len(kept)} "
            "images: "
            "assumed slope 1 and intercept 0 (values may not be Hounsfield units)"
        )
    spacing = stack.grid_spacing_mm
    volume = Volume(
        hu=hu,
        row_cosine=shared.row_cosine,
        column_cosine=shared.column_cosine,
        slice_normal=shared.normal,
        spacing_mm=(float(spacing), shared.pixel_spacing[0], shared.pixel_spacing[1]),
        origin_mm=np.asarray(kept[0].position, dtype=np.float64),
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
        transfer_syntax=_transfer_syntax_name(header),
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


def _shared_geometry(instances: list[Instance]) -> _SeriesGeometry:
    """Check that every image shares orientation, size and pixel spacing; return them."""
    lacking = {
        tag: sum(1 for inst in instances if tag not in inst.header)
        for tag in (
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "Rows",
            "Columns",
        )
    }
    for tag, count in lacking.items():
        if count:
            raise SeriesDataError(f"{count} of {len(instances)} images lack {tag}")
    bad = [
        inst.path.name for inst in instances if inst.position is None or inst.orientation is None
    ]
    if bad:
        raise SeriesDataError(f"invalid ImagePositionPatient/ImageOrientationPatient in {bad[0]}")

    orientations = np.stack([inst.orientation for inst in instances])
    reference = _most_common_row(orientations)
    differs = np.any(np.abs(orientations - reference) > ORIENTATION_TOLERANCE, axis=1)
    if differs.any():
        raise SeriesDataError(
            f"mixed orientations in one series: {int(differs.sum())} of {len(instances)} images "
            "are not parallel to the others"
        )
    sizes = {
        (int(tag_value(inst.header, "Rows")), int(tag_value(inst.header, "Columns")))
        for inst in instances
    }  # read_studies drops files whose Rows/Columns cannot be read
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise SeriesDataError(f"mixed image sizes in one series: {listed}")
    try:
        # tag_value: a damaged element raises only when read (unknown VR, odd length).
        spacings = np.asarray(
            [[float(v) for v in tag_value(inst.header, "PixelSpacing")] for inst in instances],
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

    try:
        row_cosine = geometry.unit(reference[:3])
        column_cosine = geometry.unit(reference[3:])
        normal = geometry.slice_normal(reference)
    except ValueError as error:
        raise SeriesDataError(f"invalid ImageOrientationPatient: {error}") from error
    if abs(float(np.dot(row_cosine, column_cosine))) > 1e-2:
        raise SeriesDataError(
            "invalid ImageOrientationPatient: row and column are not perpendicular"
        )
    rows, columns = next(iter(sizes))
    return _SeriesGeometry(
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        normal=normal,
        rows=rows,
        columns=columns,
        pixel_spacing=(float(spacings[0, 0]), float(spacings[0, 1])),
    )


def _most_common_row(rows: np.ndarray) -> np.ndarray:
    rounded = [tuple(np.round(row, 3)) for row in rows]
    best = max(set(rounded), key=rounded.count)
    return rows[rounded.index(best)]


def _quality_warnings(
    series: Series,
    stack: geometry.StackAnalysis,
    tilt: float,
    tilt_tag: float | None,
    n_images: int,
) -> list[str]:
    warnings: list[str] = []
    if series.series_uid_missing:
        warnings.append("the images have no SeriesInstanceUID: a derived identifier is reported")
    if stack.duplicate_positions:
        warnings.append(
            f"{stack.duplicate_positions} duplicate slice positions: kept one image per position "
            f"({stack.n_slices} of {n_images} images used)"
        )
    if stack.missing_slices:
        warnings.append(
            f"{stack.missing_slices} missing slices ({stack.missing_percent:.1f}% of "
            f"{stack.expected_slices} expected positions at {stack.spacing_mm:.2f} mm): "
            "filled by linear interpolation between neighbours"
        )
    if stack.uneven:
        warnings.append(
            f"uneven slice spacing: {stack.uneven_gaps} gaps off the nominal "
            f"{stack.spacing_mm:.2f} mm (range {stack.gaps_mm.min():.2f}-"
            f"{stack.gaps_mm.max():.2f} mm): resampled to a regular {stack.spacing_mm:.2f} mm grid"
        )
    if tilt > TILT_WARNING_DEGREES or abs(tilt_tag or 0.0) > TILT_WARNING_DEGREES:
        tag_text = (
            f"; GantryDetectorTilt tag {tilt_tag:+.1f} degrees" if tilt_tag is not None else ""
        )
        warnings.append(
            f"gantry tilt: the slices stack at {tilt:.1f} degrees to their normal{tag_text}; "
            "the volume is sheared by that angle (not corrected)"
        )
    return warnings


def _read_hu(
    kept: list[Instance], stack: geometry.StackAnalysis, shared: _SeriesGeometry
) -> tuple[np.ndarray, int]:
    """Decode the slices into one preallocated float32 array, resampling only if needed."""
    if stack.regular:
        sources = np.arange(len(kept), dtype=np.int64)
        weights = np.zeros(len(kept))
    else:
        sources, weights = geometry.regular_grid(stack.positions_mm, stack.spacing_mm)
    hu = np.empty((sources.size, shared.rows, shared.columns), dtype=np.float32)
    # One raw buffer for the whole series: a fresh 0.5 MB allocation per slice costs more
    # in page faults than reading the slice.
    raw_buffer = bytearray()
    rescale_missing = 0
    if stack.regular:
        # Every slice is decoded straight into its place in the volume.
        for index, instance in enumerate(kept):
            rescale_missing += 0 if _decode_slice(instance, shared, hu[index], raw_buffer) else 1
        return hu, rescale_missing

    cache: dict[int, np.ndarray] = {}

    def slice_hu(index: int) -> np.ndarray:
        nonlocal rescale_missing
        if index not in cache:
            for old in [key for key in cache if key < index - 1]:
                del cache[old]  # the plan only moves forward: older slices are done
            values = np.empty((shared.rows, shared.columns), dtype=np.float32)
            had_rescale = _decode_slice(kept[index], shared, values, raw_buffer)
            rescale_missing += 0 if had_rescale else 1
            cache[index] = values
        return cache[index]

    for target, (source, weight) in enumerate(zip(sources, weights, strict=True)):
        lower = slice_hu(int(source))
        if weight == 0.0:
            hu[target] = lower
        else:
            upper = slice_hu(int(source) + 1)
            np.multiply(lower, np.float32(1.0 - weight), out=hu[target])
            hu[target] += np.float32(weight) * upper
    return hu, rescale_missing


def _decode_slice(
    instance: Instance, shared: _SeriesGeometry, out: np.ndarray, raw_buffer: bytearray
) -> bool:
    """HU of one image into ``out``: stored value x RescaleSlope + RescaleIntercept (float32).

    Returns whether the image had both rescale tags.
    """
    name = instance.path.name
    dataset: Dataset = instance.header  # read_studies read every tag before the pixel data
    try:
        pixels = read_native_pixels(instance, shared.rows, shared.columns, raw_buffer)
    except OSError:
        pixels = None  # the general path below reports the problem
    if pixels is None:
        try:
            dataset = pydicom.dcmread(instance.path, force=True)
            _ensure_transfer_syntax(dataset)
            pixels = dataset.pixel_array
        except Exception as error:  # noqa: BLE001 - any decoder failure is a data error
            syntax = _transfer_syntax_name(instance.header) or "unknown transfer syntax"
            detail = " ".join(str(error).split())  # decoder messages span lines
            raise SeriesDataError(
                f"cannot decode the pixel data of {name} ({syntax}): "
                f"{type(error).__name__}: {detail}"
            ) from error
    if pixels.shape != (shared.rows, shared.columns):
        raise SeriesDataError(
            f"{name}: pixel data of shape {pixels.shape}, expected one "
            f"{shared.rows}x{shared.columns} grayscale image"
        )
    slope = _float(tag_value(dataset, "RescaleSlope"))
    intercept = _float(tag_value(dataset, "RescaleIntercept"))
    had_rescale = slope is not None and intercept is not None
    np.copyto(out, pixels, casting="unsafe")
    if slope is not None and slope != 1.0:
        out *= np.float32(slope)
    if intercept:
        out += np.float32(intercept)
    return had_rescale


def read_native_pixels(
    instance: Instance, rows: int, columns: int, buffer: bytearray | None = None
) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian image, read straight from its file.

    Parsing a whole file again with pydicom for its pixels took most of load_volume's time
    (read_studies has already parsed every header). Scanners write the pixel data as the
    last element, so it is read from the end of the file, but only after checking that the
    bytes before it are the PixelData tag with exactly the expected length. Anything else
    (compressed or big-endian data, multi-frame or colour images, trailing elements,
    odd headers) returns None and takes pydicom's general path. The values are what
    pydicom's ``pixel_array`` returns, unused high bits corrected as it does.

    With ``buffer`` the bytes are read into it (grown as needed) and the result is a view
    of it, valid until the buffer is used again.
    """
    header = instance.header
    meta = getattr(header, "file_meta", None)
    syntax = str(tag_value(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    implicit_vr = NATIVE_LITTLE_ENDIAN_SYNTAXES.get(syntax)
    if implicit_vr is None or instance.n_frames != 1:
        return None
    bits_allocated = _int(tag_value(header, "BitsAllocated"))
    bits_stored = _int(tag_value(header, "BitsStored")) or bits_allocated
    representation = _int(tag_value(header, "PixelRepresentation")) or 0
    samples = _int(tag_value(header, "SamplesPerPixel")) or 1
    if bits_allocated not in (8, 16, 32) or samples != 1 or representation not in (0, 1):
        return None
    if not 0 < bits_stored <= bits_allocated:
        return None
    signed = representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    n_bytes = rows * columns * dtype.itemsize
    value_length = n_bytes + n_bytes % 2  # element values have even lengths
    element_header = 8 if implicit_vr else 12
    size = element_header + value_length
    raw = bytearray(size) if buffer is None else buffer
    if len(raw) < size:
        raw.extend(bytes(size - len(raw)))
    view = memoryview(raw)[:size]
    with open(instance.path, "rb") as handle:
        start = os.fstat(handle.fileno()).st_size - size
        if start < 0:
            return None
        handle.seek(start)
        if handle.readinto(view) != size:
            return None
    if not _is_pixel_data_element(bytes(view[:element_header]), value_length, implicit_vr):
        return None
    pixels = np.frombuffer(raw, dtype=dtype, count=rows * columns, offset=element_header)
    pixels = pixels.reshape(rows, columns)
    if bits_stored < bits_allocated:
        # Ignore the unused high bits, sign-extending signed values (PS3.5 8.1.1).
        shift = bits_allocated - bits_stored
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)
    return pixels


def _is_pixel_data_element(head: bytes, value_length: int, implicit_vr: bool) -> bool:
    """True when ``head`` is the PixelData element's tag (and VR) with ``value_length``."""
    if head[:4] != PIXEL_DATA_TAG_BYTES:
        return False
    if implicit_vr:
        return int.from_bytes(head[4:8], "little") == value_length
    if head[4:6] not in (b"OW", b"OB") or head[6:8] != b"\x00\x00":
        return False
    return int.from_bytes(head[8:12], "little") == value_length


def _ensure_transfer_syntax(dataset: Dataset) -> None:
    """Files written without a file meta header (no preamble) lack the transfer syntax."""
    meta = dataset.file_meta
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(dataset, "original_encoding", (True, True))
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif little:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.2")  # explicit VR big endian


def _transfer_syntax_name(header: Dataset) -> str | None:
    meta = getattr(header, "file_meta", None)
    value = tag_value(meta, "TransferSyntaxUID") if meta is not None else None
    if not value:
        return None
    uid = UID(str(value))
    return str(uid.name) if uid.name != str(uid) else str(uid)


def _int(value: object) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number.is_integer() else None


def _float(value: object) -> float | None:
    try:
        return float(value) if value is not None and str(value).strip() != "" else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None

"""Reading one NIfTI file (``.nii``, ``.nii.gz``; NIfTI-1 or -2) safely into a `Volume`.

The header is read first (nibabel's parser) and checked before any voxel is: one 3D volume
(a fourth dimension of 1 is accepted), a real numeric data type, a positive finite grid, and
no more voxels than ``intake.max_series_voxels``. The values are the stored ones times
``scl_slope`` plus ``scl_inter`` when the header sets a slope (NIfTI: a slope of 0 or NaN
means "no scaling").

Geometry (docs/ARCHITECTURE.md, "Contracts: NIfTI and CT-RATE"): the affine the NIfTI
standard says to use (sform when its code is set, else qform, else the voxel sizes alone)
maps voxel indices to RAS millimetres; flipping the first two axes gives DICOM's LPS. The
array axes are laid out like a DICOM series' volume (slice, row, column): the slice axis is
the one closest to the body axis, rows run closest to posterior, columns closest to the left.
So a NIfTI converted from a DICOM series gives the same `Volume` and model input as the series.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header

from services.core.arrays import Float32Array, Float64Array
from services.core.errors import IntakeError, SeriesDataError
from services.core.preprocessing.reorientation import slp_reorientation
from services.core.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
NIFTI1_MAGIC_OFFSET = 344
NIFTI1_SINGLE_FILE_MAGIC = b"n+1\x00"
NIFTI2_SINGLE_FILE_MAGIC = b"n+2\x00\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
# RAS (NIfTI) to LPS (DICOM): the first two world axes change sign.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Below this angle between the slice axis and the normal of the rows and columns, the grid
# counts as orthogonal; above it a warning names the shear (the DICOM path's gantry tilt rule).
SHEAR_WARNING_DEGREES = 0.5
MIN_SPACING_MM = 1e-6


@dataclass(frozen=True)
class NiftiVolume:
    """A NIfTI file's volume and what the report says about how it was read."""

    volume: Volume
    geometry_source: str  # e.g. "sform (code 1)"
    shear_degrees: float
    data_type: str
    warnings: list[str] = field(default_factory=list)


def nifti_version(head: bytes) -> int | None:
    """1 or 2 when ``head`` (a file's first bytes, inflated) opens a single-file NIfTI."""
    if len(head) >= NIFTI1_MAGIC_OFFSET + 4:
        sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
        magic = head[NIFTI1_MAGIC_OFFSET : NIFTI1_MAGIC_OFFSET + 4]
        if NIFTI1_HEADER_BYTES in sizes and magic == NIFTI1_SINGLE_FILE_MAGIC:
            return 1
    if len(head) >= 4 + len(NIFTI2_SINGLE_FILE_MAGIC):
        sizes = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
        if NIFTI2_HEADER_BYTES in sizes and head[4:12] == NIFTI2_SINGLE_FILE_MAGIC:
            return 2
    return None


def has_nifti_suffix(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _open(path: Path) -> io.BufferedIOBase:
    raw = path.open("rb")
    if raw.read(2) == GZIP_MAGIC:
        raw.close()
        return gzip.open(path, "rb")
    raw.seek(0)
    return raw


def read_header(path: Path) -> Nifti1Header:
    """The header of a NIfTI-1 or -2 file (gzip or not), or IntakeError with the reason."""
    try:
        with _open(path) as stream:
            head = stream.read(NIFTI2_HEADER_BYTES)
            version = nifti_version(head)
            if version is None:
                raise IntakeError(f"{path.name} is not a single-file NIfTI (no n+1/n+2 magic)")
            stream.seek(0)
            header_class = Nifti2Header if version == 2 else Nifti1Header
            return header_class.from_fileobj(stream, check=True)
    except IntakeError:
        raise
    except Exception as error:  # any parse failure is a broken file; say why
        raise IntakeError(f"{path.name} is not a readable NIfTI header: {error}") from error


def checked_shape(header: Nifti1Header, max_voxels: int | None) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3:
        raise SeriesDataError(f"the NIfTI holds a {len(shape)}D image, not a volume")
    if any(n != 1 for n in shape[3:]):
        raise SeriesDataError(
            f"the NIfTI holds {math.prod(shape[3:])} volumes (shape {shape}); one volume per "
            "file is screened"
        )
    x, y, z = shape[:3]
    if min(x, y, z) < 1:
        raise SeriesDataError(f"the NIfTI has an empty dimension (shape {shape})")
    voxels = x * y * z
    if max_voxels is not None and voxels > max_voxels:
        raise SeriesDataError(
            f"the volume is too large: {x}x{y}x{z} = {voxels:,} voxels, above the "
            f"{max_voxels:,} limit (intake.max_series_voxels)"
        )
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise SeriesDataError(f"the NIfTI data type {dtype} is not a real number type")
    return x, y, z


def read_scaled_data(path: Path, header: Nifti1Header) -> Float32Array:
    """The voxel values x[i, j, k] as float32 with scl_slope/scl_inter applied."""
    try:
        with _open(path) as stream:
            raw = np.asarray(header.raw_data_from_fileobj(stream))
    except Exception as error:  # a short or unreadable data block
        raise SeriesDataError(f"cannot read the NIfTI voxel data (truncated?): {error}") from error
    data = raw.reshape(raw.shape[:3], order="F").astype(np.float32, copy=True, order="F")
    slope, intercept = header.get_slope_inter()
    if slope is not None and (slope != 1.0 or intercept != 0.0):
        data *= np.float32(slope)
        data += np.float32(intercept or 0.0)
    if not np.isfinite(data).all():
        raise SeriesDataError("the NIfTI voxel data hold NaN or infinite values")
    return data


def geometry_source(header: Nifti1Header) -> tuple[Float64Array, str]:
    """The affine the NIfTI standard says to use, and which one it is."""
    sform_code = int(header["sform_code"])
    qform_code = int(header["qform_code"])
    if sform_code > 0:
        return np.asarray(header.get_sform(), dtype=np.float64), f"sform (code {sform_code})"
    if qform_code > 0:
        return np.asarray(header.get_qform(), dtype=np.float64), f"qform (code {qform_code})"
    return (
        np.asarray(header.get_base_affine(), dtype=np.float64),
        "no sform or qform: voxel sizes only (orientation unknown)",
    )


def load_nifti_volume(path: Path, *, max_voxels: int | None) -> NiftiVolume:
    """One NIfTI file as a `Volume` in HU with its LPS geometry (module docstring)."""
    path = Path(path)
    header = read_header(path)
    checked_shape(header, max_voxels)
    affine, source = geometry_source(header)
    data = read_scaled_data(path, header)
    volume, shear = volume_from_affine(data, affine)
    warnings: list[str] = []
    if source.startswith("no sform"):
        warnings.append(
            "the NIfTI header sets neither sform nor qform: orientation unknown, the voxel "
            "axes were taken as left, posterior, superior"
        )
    if shear > SHEAR_WARNING_DEGREES:
        warnings.append(
            f"sheared grid: the slices stack at {shear:.1f} degrees to their normal "
            "(gantry tilt?); not corrected"
        )
    return NiftiVolume(
        volume=volume,
        geometry_source=source,
        shear_degrees=shear,
        data_type=str(header.get_data_dtype()),
        warnings=warnings,
    )


def volume_from_affine(data: Float32Array, affine_ras: Float64Array) -> tuple[Volume, float]:
    """The `Volume` of ``data[i, j, k]`` placed by a voxel-to-RAS affine; and its shear angle.

    Volume axes (slice, row, column) take the array axes closest to superior, posterior and
    left; the slice normal is the normal of rows and columns, pointing where the slice index
    grows, and the slice spacing is the distance between slices along it (as the DICOM path
    measures it, so that a sheared grid gives the same spacing there and here).
    """
    affine = np.asarray(affine_ras, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise SeriesDataError("the NIfTI affine is not a finite 4x4 matrix")
    axes_lps = RAS_TO_LPS @ affine[:3, :3]  # column a: LPS step of array axis a
    steps = np.linalg.norm(axes_lps, axis=0)
    if steps.min() < MIN_SPACING_MM or abs(np.linalg.det(axes_lps)) < MIN_SPACING_MM**3:
        raise SeriesDataError(f"the NIfTI affine is degenerate (voxel steps {steps.round(4)})")
    directions = (axes_lps / steps).T  # row a: LPS unit direction of array axis a
    plan = slp_reorientation(directions)
    slice_axis, left_axis, posterior_axis = plan.permutation
    hu = np.ascontiguousarray(data.transpose(slice_axis, posterior_axis, left_axis))
    row_cosine = directions[left_axis]  # along a row: the column index grows
    column_cosine = directions[posterior_axis]  # down a column: the row index grows
    normal = np.cross(row_cosine, column_cosine)
    normal /= np.linalg.norm(normal)
    slice_step = axes_lps[:, slice_axis]
    if float(np.dot(normal, slice_step)) < 0:
        normal = -normal
    slice_spacing = float(np.dot(normal, slice_step))
    cosine = min(1.0, slice_spacing / float(steps[slice_axis]))
    shear = math.degrees(math.acos(cosine))
    origin = RAS_TO_LPS @ affine[:3, 3]
    volume = Volume(
        hu=hu,
        row_cosine=row_cosine,
        column_cosine=column_cosine,
        slice_normal=normal,
        spacing_mm=(slice_spacing, float(steps[posterior_axis]), float(steps[left_axis])),
        origin_mm=origin,
    )
    return volume, shear

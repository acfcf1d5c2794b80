"""The body-part regression (bpreg-compatible) network input from a Volume (DESIGN.md section 9).

The contract works on ``x[i, j, k]``: i toward the patient's left, j toward posterior, k toward
superior, spacing (sx, sy, sz). Every slice k is clipped to [-1000, 1500] HU and rescaled to
[-1, 1], blurred in-plane with a gaussian (sigma = 0.8 * 0.25 / f per axis, f = new size / old
size; scipy.ndimage.gaussian_filter semantics: mode 'reflect', truncate 3), resized bilinearly
to 3.5 mm pixels (cv2.resize INTER_LINEAR semantics: half-pixel centres, no antialiasing) and
centre-padded with -1 / centre-cropped to 128 x 128. The network takes ``[k, 1, 128(i), 128(j)]``
with the slices ordered feet to head.

How it is computed: after the clip everything is linear and separable. Along one in-plane axis
the blur (with its reflected borders) followed by the resize is one matrix ``resize @ blur`` of
shape [new size, old size]; the crop keeps some of its rows, a flipped axis reverses its
columns. A slice is then ``A_i @ clip(slice) @ A_j^T``: two matrix products, run by BLAS on a
few slices at a time, each matrix cut into row bands that read only the columns they need
(the matrices have a few taps per row). The rows of both matrices sum to one, so the affine
rescale to [-1, 1] commutes with them and is applied to the small result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.core.arrays import (
    BprSlices,
    Float32Array,
    Float64Array,
    Int64Array,
    IntegerArray,
    PositionsMm,
)
from services.core.preprocessing import slp_reorientation
from services.core.volume import Volume

HU_MIN = -1000.0
HU_MAX = 1500.0
TARGET_PIXEL_MM = 3.5
OUTPUT_SIZE = 128
PAD_VALUE = -1.0
# The blur bpreg applies before shrinking: sigma 0.8 at its reference downscaling factor 0.25,
# scaled inversely with the actual factor.
BLUR_SIGMA_AT_REFERENCE = 0.8
REFERENCE_DOWNSCALING = 0.25
BLUR_TRUNCATE = 3.0
# Slices clipped and multiplied at once: the clipped copy of a 512 x 512 chunk stays ~8 MiB.
SLICES_PER_CHUNK = 8
# The network costs ~10 GFLOP per slice (4 slices took 0.12-0.7 s in onnxruntime on the shared
# 2-core CPU here, where the CT-CLIP encoder takes 3.7-5 s), so only a few slices are scored:
# at most 80 mm apart, at most 4 per series, the ends included. The covered landmarks depend
# only on the end slices.
DEFAULT_SLICE_SPACING_MM = 80.0
DEFAULT_MAX_SLICES = 4
# Round (extent / spacing) down when it is this close to a whole number.
SPACING_SLACK = 1e-6
# The operators are banded (a few taps per output sample): multiplying 8-row bands by the
# columns they read was 3-4x faster than the dense products on a 512 x 512 slice.
ROWS_PER_BAND = 8

_RESCALE_GAIN = 2.0 / (HU_MAX - HU_MIN)
_RESCALE_OFFSET = -1.0 - HU_MIN * _RESCALE_GAIN


@dataclass(frozen=True)
class MatrixBand:
    """Rows ``rows`` of an operator, whose non-zero columns all lie in ``columns``."""

    rows: slice
    columns: slice
    weights: Float32Array  # float32 [rows, columns]: the non-zero block


@dataclass(frozen=True)
class AxisOperator:
    """Blur + resize + crop of one in-plane axis as a matrix, and where its rows land."""

    matrix: Float32Array  # float32 [kept output samples, input samples]
    out_start: int  # first output row in the 128-sample axis (> 0 when padded)
    resized_length: int  # int(n * spacing / 3.5 + 0.5), before crop / pad

    def bands(self, rows_per_band: int = ROWS_PER_BAND) -> list[MatrixBand]:
        """The matrix cut into row bands, each with the column range it reads."""
        bands = []
        for first in range(0, self.matrix.shape[0], rows_per_band):
            block = self.matrix[first : first + rows_per_band]
            used = np.flatnonzero(np.any(block != 0, axis=0))
            low, high = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            bands.append(
                MatrixBand(
                    rows=slice(first, first + block.shape[0]),
                    columns=slice(low, high),
                    weights=np.ascontiguousarray(block[:, low:high]),
                )
            )
        return bands


@dataclass(frozen=True)
class BprLayout:
    """How ``volume.hu`` maps onto the contract's ``x[i, j, k]`` (left, posterior, superior)."""

    axis_i: int  # array axis running toward the patient's left
    axis_j: int  # ... toward posterior
    axis_k: int  # ... toward superior
    flip_i: bool  # the array axis runs the other way (right, anterior, inferior)
    flip_j: bool
    flip_k: bool
    spacing_xyz: tuple[float, float, float]  # (sx, sy, sz) in mm
    shape_xyz: tuple[int, int, int]  # (X, Y, Z)


@dataclass(frozen=True)
class SliceSelection:
    """Slices to score, as contract slice indices k (0 = lowest), and their heights."""

    indices: Int64Array  # int64, increasing, feet to head
    positions_mm: PositionsMm  # float64, k * sz: height above the lowest slice


def bpr_layout(volume: Volume) -> BprLayout:
    """Which array axis of ``volume.hu`` is i, j and k, and whether each is reversed."""
    plan = slp_reorientation(volume.axis_directions())
    # slp_reorientation orders its axes (superior, left, posterior).
    axis_k, axis_i, axis_j = plan.permutation
    flip_k, flip_i, flip_j = plan.flips
    spacing = volume.spacing_mm
    shape = volume.hu.shape
    return BprLayout(
        axis_i=axis_i,
        axis_j=axis_j,
        axis_k=axis_k,
        flip_i=flip_i,
        flip_j=flip_j,
        flip_k=flip_k,
        spacing_xyz=(float(spacing[axis_i]), float(spacing[axis_j]), float(spacing[axis_k])),
        shape_xyz=(int(shape[axis_i]), int(shape[axis_j]), int(shape[axis_k])),
    )


def resized_length(n: int, spacing_mm: float) -> int:
    """bpreg's in-plane size at 3.5 mm pixels, rounded half up."""
    return int(n * spacing_mm / TARGET_PIXEL_MM + 0.5)


def gaussian_blur_matrix(n: int, sigma: float, truncate: float = BLUR_TRUNCATE) -> Float64Array:
    """[n, n] matrix of a 1D gaussian filter with scipy.ndimage's 'reflect' borders.

    'reflect' mirrors about the edge of the outer samples (d c b a | a b c d | d c b a); an
    index beyond the array folds back with period 2n, so kernels wider than the array work too.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else (offsets == 0) * 1.0
    weights = weights / weights.sum()
    sources = np.arange(n)[:, None] + offsets[None, :]
    folded = np.mod(sources, 2 * n)
    folded = np.where(folded >= n, 2 * n - 1 - folded, folded)
    matrix = np.zeros((n, n), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n)[:, None], folded.shape)
    np.add.at(matrix, (rows, folded), np.broadcast_to(weights, folded.shape))
    return matrix


def linear_resize_matrix(n_in: int, n_out: int) -> Float64Array:
    """[n_out, n_in] matrix of cv2.resize INTER_LINEAR along one axis.

    Output sample d reads input position (d + 0.5) * n_in / n_out - 0.5 (half-pixel centres),
    clamped to the first and last sample; no antialiasing however strong the shrink.
    """
    position = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    position = np.clip(position, 0.0, n_in - 1)
    left = np.minimum(np.floor(position).astype(np.int64), n_in - 1)
    right = np.minimum(left + 1, n_in - 1)
    fraction = position - left
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, left), 1.0 - fraction)
    np.add.at(matrix, (rows, right), fraction)
    return matrix


def axis_operator(n: int, spacing_mm: float, *, flip: bool = False) -> AxisOperator:
    """Blur, resize and centre crop of one in-plane axis of ``n`` samples as one matrix."""
    new_length = resized_length(n, spacing_mm)
    if new_length < 2:
        raise ValueError(
            f"an in-plane axis of {n} samples at {spacing_mm} mm shrinks to {new_length} "
            f"pixels at {TARGET_PIXEL_MM} mm; the body-part network needs at least 2"
        )
    factor = new_length / n
    sigma = BLUR_SIGMA_AT_REFERENCE * REFERENCE_DOWNSCALING / factor
    matrix = linear_resize_matrix(n, new_length) @ gaussian_blur_matrix(n, sigma)
    if new_length > OUTPUT_SIZE:
        start = (new_length - OUTPUT_SIZE) // 2
        matrix = matrix[start : start + OUTPUT_SIZE]
        out_start = 0
    else:
        out_start = (OUTPUT_SIZE - new_length) // 2
    if flip:
        matrix = matrix[:, ::-1]
    return AxisOperator(
        matrix=np.ascontiguousarray(matrix, dtype=np.float32),
        out_start=out_start,
        resized_length=new_length,
    )


def slice_positions_mm(volume: Volume) -> PositionsMm:
    """Height of every contract slice k above the lowest one (k * sz), feet to head."""
    layout = bpr_layout(volume)
    return np.arange(layout.shape_xyz[2], dtype=np.float64) * layout.spacing_xyz[2]


def select_slices(
    volume: Volume,
    spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
) -> SliceSelection:
    """Evenly spread slices at most ``spacing_mm`` apart, always with the first and last.

    The scores are linear in body height, so a sparse subset finds the covered landmarks, and
    the end slices fix how far the scan reaches. ``max_slices`` (at least 2) caps the count
    for long scans, since every slice costs a full network pass; the spacing then widens.
    """
    if not spacing_mm > 0:
        raise ValueError(f"the slice spacing must be positive, got {spacing_mm}")
    if max_slices is not None and max_slices < 2:
        raise ValueError(f"max_slices must be at least 2 (first and last), got {max_slices}")
    layout = bpr_layout(volume)
    count = layout.shape_xyz[2]
    slice_mm = layout.spacing_xyz[2]
    wanted = math.ceil((count - 1) * slice_mm / spacing_mm - SPACING_SLACK) + 1
    if max_slices is not None:
        wanted = min(wanted, max_slices)
    wanted = max(1, min(wanted, count))
    indices = np.unique(np.round(np.linspace(0, count - 1, wanted)).astype(np.int64))
    return SliceSelection(indices=indices, positions_mm=indices.astype(np.float64) * slice_mm)


def bpr_input(volume: Volume, indices: IntegerArray | list[int] | None = None) -> BprSlices:
    """The network input ``[len(indices), 1, 128, 128]`` float32 (all slices by default).

    ``indices`` are contract slice indices k (0 = lowest slice, as `select_slices` gives);
    the output keeps their order.
    """
    layout = bpr_layout(volume)
    depth = layout.shape_xyz[2]
    wanted = np.arange(depth) if indices is None else np.asarray(indices, dtype=np.int64)
    if wanted.ndim != 1:
        raise ValueError("slice indices must be one-dimensional")
    if wanted.size and (wanted.min() < 0 or wanted.max() >= depth):
        raise ValueError(
            f"slice indices must lie in [0, {depth}), got {wanted.min()}..{wanted.max()}"
        )
    operator_i = axis_operator(layout.shape_xyz[0], layout.spacing_xyz[0], flip=layout.flip_i)
    operator_j = axis_operator(layout.shape_xyz[1], layout.spacing_xyz[1], flip=layout.flip_j)
    array_indices = depth - 1 - wanted if layout.flip_k else wanted

    # Bring the slice axis first; the two in-plane axes keep their memory order (a, b).
    slices_first = np.moveaxis(volume.hu, layout.axis_k, 0)
    i_is_first = layout.axis_i < layout.axis_j
    operator_a, operator_b = (operator_i, operator_j) if i_is_first else (operator_j, operator_i)
    bands_a, bands_b = operator_a.bands(), operator_b.bands()
    kept_a, kept_b = operator_a.matrix.shape[0], operator_b.matrix.shape[0]

    output = np.full((wanted.size, 1, OUTPUT_SIZE, OUTPUT_SIZE), PAD_VALUE, dtype=np.float32)
    rows_i = slice(operator_i.out_start, operator_i.out_start + operator_i.matrix.shape[0])
    rows_j = slice(operator_j.out_start, operator_j.out_start + operator_j.matrix.shape[0])
    for start in range(0, wanted.size, SLICES_PER_CHUNK):
        chunk_indices = array_indices[start : start + SLICES_PER_CHUNK]
        chunk = np.take(slices_first, chunk_indices, axis=0).astype(np.float32, copy=False)
        np.clip(chunk, HU_MIN, HU_MAX, out=chunk)
        count, length_a, length_b = chunk.shape
        # Along b (contiguous in memory) first, as large products over the whole chunk.
        flat = chunk.reshape(count * length_a, length_b)
        along_b = np.empty((count * length_a, kept_b), dtype=np.float32)
        for band in bands_b:
            along_b[:, band.rows] = flat[:, band.columns] @ band.weights.T
        along_b = along_b.reshape(count, length_a, kept_b)
        planes = np.empty((count, kept_a, kept_b), dtype=np.float32)
        for band in bands_a:
            planes[:, band.rows] = np.matmul(band.weights, along_b[:, band.columns])
        if not i_is_first:
            planes = planes.transpose(0, 2, 1)
        planes *= _RESCALE_GAIN
        planes += _RESCALE_OFFSET
        output[start : start + count, 0, rows_i, rows_j] = planes
    return output


def bpr_input_all_slices(volume: Volume) -> BprSlices:
    """``[k, 1, 128, 128]``: the network input for every slice, feet to head."""
    return bpr_input(volume, None)


__all__ = [
    "AxisOperator",
    "BprLayout",
    "MatrixBand",
    "SliceSelection",
    "axis_operator",
    "bpr_input",
    "bpr_input_all_slices",
    "bpr_layout",
    "gaussian_blur_matrix",
    "linear_resize_matrix",
    "resized_length",
    "select_slices",
    "slice_positions_mm",
]

"""Slice geometry of a CT series: pure functions on positions and orientations (no I/O).

Slices are ordered by their position along the slice normal (the cross product of the two
ImageOrientationPatient vectors, dotted with ImagePositionPatient), never by InstanceNumber,
which scanners number in acquisition order and anonymisers sometimes rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.arrays import (
    Float64Array,
    FloatArray,
    Int64Array,
    LpsVector,
    Orientation,
    PositionsMm,
)

DUPLICATE_TOLERANCE_MM = 0.01  # positions closer than this are the same slice position
MIN_SPACING_MM = 0.05  # below this a "spacing" is numerical noise, not a slice distance
# Two ImageOrientationPatient values are the same orientation when every component agrees
# within this; orientations are grouped by rounding to ORIENTATION_DECIMALS (same scale).
ORIENTATION_TOLERANCE = 1e-3
ORIENTATION_DECIMALS = 3
# A direction (or the cross product of two orientation vectors) shorter than this is
# degenerate: e.g. ImageOrientationPatient with parallel row and column vectors.
MIN_DIRECTION_NORM = 1e-6


@dataclass(frozen=True)
class StackAnalysis:
    """How the slices of one series stack up along their normal."""

    order: Int64Array  # indices of the input images kept, sorted by position (duplicates dropped)
    positions_mm: PositionsMm  # their positions along the normal, ascending
    duplicate_positions: int  # images dropped because another image has the same position
    spacing_mm: float  # nominal distance between neighbouring slice positions
    gaps_mm: Float64Array  # distances between neighbouring kept positions
    missing_slices: int  # positions absent from gaps that are whole multiples of the spacing
    uneven_gaps: int  # gaps that are not a whole multiple of the spacing (within tolerance)

    @property
    def n_slices(self) -> int:
        return int(self.order.size)

    @property
    def expected_slices(self) -> int:
        return self.n_slices + self.missing_slices

    @property
    def missing_percent(self) -> float:
        return 100.0 * self.missing_slices / self.expected_slices if self.expected_slices else 0.0

    @property
    def uneven(self) -> bool:
        return self.uneven_gaps > 0

    @property
    def regular(self) -> bool:
        """True when the slices can be stacked as they are: nothing missing, spacing even."""
        return self.missing_slices == 0 and not self.uneven

    @property
    def coverage_mm(self) -> float:
        """Length along the normal covered by the slices (first to last centre, plus one spacing)."""
        return float(self.positions_mm[-1] - self.positions_mm[0]) + self.grid_spacing_mm

    @property
    def grid_spacing_mm(self) -> float:
        """Spacing of the volume built from these slices.

        Regular stacks use the mean distance, which absorbs rounding of the stored positions;
        stacks that must be resampled use the nominal spacing of the grid they are put on.
        """
        if self.regular and self.n_slices > 1:
            return float(self.positions_mm[-1] - self.positions_mm[0]) / (self.n_slices - 1)
        return self.spacing_mm


def unit(vector: FloatArray) -> LpsVector:
    norm = float(np.linalg.norm(vector))
    if norm < MIN_DIRECTION_NORM:
        raise ValueError("zero-length direction vector")
    return np.asarray(vector, dtype=np.float64) / norm


def slice_normal(orientation: Sequence[float] | Orientation) -> LpsVector:
    """Unit normal of the image plane: row direction x column direction (DICOM LPS)."""
    values = np.asarray(orientation, dtype=np.float64)
    return unit(np.cross(values[:3], values[3:6]))


def most_common_orientation(orientations: Float64Array) -> Orientation:
    """The orientation most images share, after rounding to ORIENTATION_DECIMALS.

    ``orientations`` is ``[n, 6]``; the result is one of its rows (not the rounded value),
    the first of the most common group, so that ties resolve in file order.
    """
    rows = np.asarray(orientations, dtype=np.float64)
    keys = [tuple(np.round(row, ORIENTATION_DECIMALS)) for row in rows]
    counts: dict[tuple[float, ...], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    best = max(counts, key=lambda key: counts[key])  # first key reaching the highest count
    return rows[keys.index(best)]


def positions_along(normal: LpsVector, image_positions: Float64Array) -> PositionsMm:
    """Signed distance of every ImagePositionPatient along the normal (mm)."""
    return np.asarray(image_positions, dtype=np.float64) @ np.asarray(normal, dtype=np.float64)


def sort_and_deduplicate(
    positions_mm: PositionsMm, tie_breakers: Sequence[tuple[object, ...]] | None = None
) -> tuple[Int64Array, int]:
    """Indices sorted by position with one image kept per position, and the duplicate count.

    Among images at the same position the one that sorts first by ``tie_breakers`` (e.g.
    (InstanceNumber, path)) is kept, so the choice is deterministic.
    """
    positions_mm = np.asarray(positions_mm, dtype=np.float64)
    count = positions_mm.size
    keys = tie_breakers if tie_breakers is not None else [(i,) for i in range(count)]
    order = sorted(range(count), key=lambda i: (positions_mm[i], keys[i]))
    kept: list[int] = []
    for index in order:
        if kept and abs(positions_mm[index] - positions_mm[kept[-1]]) < DUPLICATE_TOLERANCE_MM:
            continue
        kept.append(index)
    return np.asarray(kept, dtype=np.int64), count - len(kept)


def nominal_spacing(
    gaps_mm: Float64Array, hints_mm: Sequence[float | None] = (), tolerance_fraction: float = 0.1
) -> float:
    """The slice spacing that explains the gaps, preferring the median gap.

    A series with a few missing slices has gaps of 1x, 2x, 3x... the spacing: the median
    explains them all. A sparse subset of a series (most slices missing) has a median that
    is itself a multiple; then the header's SpacingBetweenSlices / SliceThickness or the
    smallest gap is tried, and the largest candidate that explains every gap wins (it
    assumes the fewest missing slices). When nothing explains every gap the spacing is
    uneven, and the median is the most representative value.
    """
    gaps = np.asarray(gaps_mm, dtype=np.float64)
    if gaps.size == 0:
        valid_hints = [h for h in hints_mm if h and h > MIN_SPACING_MM]
        return float(valid_hints[0]) if valid_hints else 1.0
    median = float(np.median(gaps))
    if _explains(gaps, median, tolerance_fraction):
        return median
    candidates = [float(h) for h in hints_mm if h and h > MIN_SPACING_MM] + [float(gaps.min())]
    fitting = [
        c for c in candidates if c > MIN_SPACING_MM and _explains(gaps, c, tolerance_fraction)
    ]
    return max(fitting) if fitting else median


def _explains(gaps: Float64Array, spacing: float, tolerance_fraction: float) -> bool:
    multiples = gaps / spacing
    nearest = np.rint(multiples)
    return bool(np.all(nearest >= 1) and np.all(np.abs(multiples - nearest) <= tolerance_fraction))


def count_missing_and_uneven(
    gaps_mm: Float64Array, spacing_mm: float, tolerance_fraction: float
) -> tuple[int, int]:
    """(missing slices, uneven gaps): a gap of k spacings (k >= 2) hides k - 1 slices."""
    gaps = np.asarray(gaps_mm, dtype=np.float64)
    if gaps.size == 0:
        return 0, 0
    multiples = gaps / spacing_mm
    nearest = np.rint(multiples)
    whole = (nearest >= 1) & (np.abs(multiples - nearest) <= tolerance_fraction)
    missing = int(np.sum(nearest[whole] - 1))
    uneven = int(np.sum(~whole))
    return missing, uneven


def analyse_stack(
    positions_mm: PositionsMm,
    tolerance_fraction: float,
    hints_mm: Sequence[float | None] = (),
    tie_breakers: Sequence[tuple[object, ...]] | None = None,
) -> StackAnalysis:
    """Sort, de-duplicate and measure the slice positions of one series."""
    order, duplicates = sort_and_deduplicate(positions_mm, tie_breakers)
    sorted_positions = np.asarray(positions_mm, dtype=np.float64)[order]
    gaps = np.diff(sorted_positions)
    spacing = nominal_spacing(gaps, hints_mm, tolerance_fraction)
    missing, uneven = count_missing_and_uneven(gaps, spacing, tolerance_fraction)
    return StackAnalysis(
        order=order,
        positions_mm=sorted_positions,
        duplicate_positions=duplicates,
        spacing_mm=spacing,
        gaps_mm=gaps,
        missing_slices=missing,
        uneven_gaps=uneven,
    )


def stacking_tilt_degrees(
    first_position: LpsVector, last_position: LpsVector, normal: LpsVector
) -> float:
    """Angle between the slice normal and the line through the first and last slice origins.

    Zero for an ordinary axial stack; the gantry tilt when the slices were acquired with
    a tilted gantry (the image plane tilts but the table still moves along z).
    """
    direction = np.asarray(last_position, dtype=np.float64) - np.asarray(
        first_position, dtype=np.float64
    )
    length = float(np.linalg.norm(direction))
    if length < MIN_SPACING_MM:
        return 0.0
    cosine = abs(float(np.dot(direction / length, unit(normal))))
    return math.degrees(math.acos(min(1.0, cosine)))


def regular_grid(positions_mm: PositionsMm, spacing_mm: float) -> tuple[Int64Array, Float64Array]:
    """Linear interpolation plan onto a regular grid from the first to the last position.

    Returns (source index j, weight w) per grid slice: value = (1 - w) * S[j] + w * S[j + 1].
    A grid position that coincides with a source slice gets w = 0 (the slice itself).
    """
    positions = np.asarray(positions_mm, dtype=np.float64)
    # The grid never reaches past the last slice: round only when the span is (nearly) a
    # whole number of spacings, otherwise stop at the last grid position inside it.
    count = math.floor((positions[-1] - positions[0]) / spacing_mm + 0.1) + 1
    targets = positions[0] + spacing_mm * np.arange(count)
    if positions.size == 1:
        return np.zeros(count, dtype=np.int64), np.zeros(count)
    lower = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, positions.size - 2)
    span = positions[lower + 1] - positions[lower]
    weights = np.clip((targets - positions[lower]) / span, 0.0, 1.0)
    # Snap to a source slice when the grid lands on it, so regular parts stay untouched.
    snap = 1e-3 * spacing_mm
    at_upper = np.abs(targets - positions[lower + 1]) < snap
    lower = np.where(at_upper, lower + 1, lower)
    weights = np.where(at_upper | (np.abs(targets - positions[lower]) < snap), 0.0, weights)
    return lower.astype(np.int64), weights


def interpolated_indices(stack: StackAnalysis) -> list[int]:
    """The slices of the built volume that are blends of two acquired slices, not acquired
    ones (the grid positions of ``regular_grid`` that land on no source slice): missing
    slices filled in, and every off-grid slice of an unevenly spaced series."""
    if stack.regular:
        return []
    _sources, weights = regular_grid(stack.positions_mm, stack.spacing_mm)
    return [int(index) for index in np.flatnonzero(weights != 0.0)]

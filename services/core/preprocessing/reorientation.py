"""Reorientation to SLP+: which array axis runs toward superior, left and posterior.

CT-CLIP was trained on SLP+ volumes (docs/ARCHITECTURE.md, "Contracts"): axis 0 runs
toward the patient's superior, axis 1 toward the left, axis 2 toward posterior (DICOM LPS).
The body-part regression input (services/core/body_part/bpr_input.py) starts from the same
plan with other axes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from services.core.arrays import HuVolume, LpsDirections
from services.core.volume import Volume

# LPS coordinate index of the direction each SLP+ axis must run toward:
# axis 0 -> superior (+z, index 2), axis 1 -> left (+x, index 0), axis 2 -> posterior (+y, 1).
SLP_LPS_COMPONENTS: tuple[int, int, int] = (2, 0, 1)


@dataclass(frozen=True)
class Reorientation:
    """How array axes map onto SLP+: ``slp = hu.transpose(permutation)`` then flip ``flips``."""

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]


def slp_reorientation(axis_directions: LpsDirections) -> Reorientation:
    """The axis permutation and flips that bring an array to SLP+.

    ``axis_directions[i]`` is the LPS direction of array axis ``i``. Each SLP+ axis takes
    the array axis best aligned with its anatomical direction; for oblique scans the
    permutation maximising the total alignment wins, so every axis is used exactly once.
    """
    directions = np.asarray(axis_directions, dtype=np.float64)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise ValueError(f"axis directions must be a finite 3x3 matrix, got {directions.shape}")
    best: tuple[float, tuple[int, int, int]] | None = None
    for order in itertools.permutations(range(3)):
        permutation = (order[0], order[1], order[2])
        alignment = sum(
            abs(directions[source, SLP_LPS_COMPONENTS[target]])
            for target, source in enumerate(permutation)
        )
        if best is None or alignment > best[0] + 1e-9:
            best = (alignment, permutation)
    assert best is not None
    permutation = best[1]
    flip = [
        bool(directions[source, SLP_LPS_COMPONENTS[target]] < 0)
        for target, source in enumerate(permutation)
    ]
    return Reorientation(permutation=permutation, flips=(flip[0], flip[1], flip[2]))


def reorient_to_slp(volume: Volume) -> tuple[HuVolume, tuple[float, float, float]]:
    """A view of ``volume.hu`` in SLP+ order and the spacing of its axes (no copy)."""
    plan = slp_reorientation(volume.axis_directions())
    view = volume.hu.transpose(plan.permutation)
    flip_axes = tuple(axis for axis, flip in enumerate(plan.flips) if flip)
    if flip_axes:
        view = np.flip(view, axis=flip_axes)
    first, second, third = (float(volume.spacing_mm[source]) for source in plan.permutation)
    return view, (first, second, third)

"""CT-CLIP model input from a Volume, in numpy only (docs/ARCHITECTURE.md, "Contracts").

The contract, step by step: reorient to SLP+ (axis 0 toward superior, axis 1 toward
the patient's left, axis 2 toward posterior; reorientation.py), clip to the HU window,
resize trilinearly with ``align_corners=False`` semantics to the target spacing (new size
``int(n * spacing / target)``), divide by 1000, centre crop / pad to the target shape with
-1 (resampling.py does the last four in one chunked pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.arrays import FloatArray, ModelInput, ModelVolume
from services.core.preprocessing.reorientation import (
    SLP_LPS_COMPONENTS,
    Reorientation,
    reorient_to_slp,
    slp_reorientation,
)
from services.core.preprocessing.resampling import (
    PAD_VALUE,
    AxisPlan,
    crop_pad_plan,
    linear_sample_weights,
    resample_crop_pad,
    resize_trilinear,
    resized_shape,
)
from services.core.volume import Volume

HU_SCALE = 1000.0

__all__ = [
    "HU_SCALE",
    "PAD_VALUE",
    "SLP_LPS_COMPONENTS",
    "AxisPlan",
    "PreprocessingTarget",
    "Reorientation",
    "crop_pad_plan",
    "linear_sample_weights",
    "preprocess_array",
    "preprocess_volume",
    "reorient_to_slp",
    "resample_crop_pad",
    "resize_trilinear",
    "resized_shape",
    "slp_reorientation",
    "to_model_input",
]


@dataclass(frozen=True)
class PreprocessingTarget:
    """What the model expects: shape (D, H, W), spacing in mm per axis, HU window."""

    shape: tuple[int, int, int] = (240, 480, 480)
    spacing_mm: tuple[float, float, float] = (1.5, 0.75, 0.75)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)


def preprocess_array(
    slp: FloatArray, spacing_mm: Sequence[float], target: PreprocessingTarget
) -> ModelVolume:
    """SLP+ HU array -> model input volume (D, H, W) float32 in [-1, 1], as the contract says."""
    new_shape = resized_shape(slp.shape, spacing_mm, target.spacing_mm)
    if min(new_shape) < 1:
        raise ValueError(
            f"volume {slp.shape} at spacing {tuple(spacing_mm)} mm is too small to resample"
        )
    plans = [
        crop_pad_plan(n, m, t) for n, m, t in zip(slp.shape, new_shape, target.shape, strict=True)
    ]
    return resample_crop_pad(slp, plans, clip=target.hu_window, scale=1.0 / HU_SCALE)


def preprocess_volume(volume: Volume, target: PreprocessingTarget) -> ModelVolume:
    """Volume in any orientation -> model input volume (D, H, W) float32.

    Same result as ``preprocess_array(*reorient_to_slp(volume), target)``, computed in the
    volume's own memory order: reading a transposed view of a 600-slice study is slow
    (every sample a cache miss), so the passes read the stored layout (flipped axes are
    only read backwards) and the last pass writes into a transposed view of the output.
    """
    orientation = slp_reorientation(volume.axis_directions())
    permutation = orientation.permutation  # SLP axis t reads array axis permutation[t]
    slp_shape = [volume.hu.shape[source] for source in permutation]
    slp_spacing = [float(volume.spacing_mm[source]) for source in permutation]
    new_shape = resized_shape(slp_shape, slp_spacing, target.spacing_mm)
    if min(new_shape) < 1:
        raise ValueError(
            f"volume {tuple(slp_shape)} at spacing {tuple(slp_spacing)} mm is too small to resample"
        )
    slp_plans = [
        crop_pad_plan(n, m, t) for n, m, t in zip(slp_shape, new_shape, target.shape, strict=True)
    ]
    native_plans: list[AxisPlan] = [slp_plans[0]] * 3
    for slp_axis, source in enumerate(permutation):
        native_plans[source] = slp_plans[slp_axis]
    flipped = tuple(
        source for source, flip in zip(permutation, orientation.flips, strict=True) if flip
    )
    native = np.flip(volume.hu, axis=flipped) if flipped else volume.hu
    output = np.empty(target.shape, dtype=np.float32)
    # Axis ``source`` of this view is SLP axis t with permutation[t] == source.
    output_in_native_order = output.transpose(np.argsort(permutation))
    resample_crop_pad(
        native,
        native_plans,
        clip=target.hu_window,
        scale=1.0 / HU_SCALE,
        out=output_in_native_order,
    )
    return output


def to_model_input(volumes: Sequence[ModelVolume] | ModelVolume) -> ModelInput:
    """Stack (D, H, W) volumes into the model's ``[B, 1, D, H, W]`` float32 batch."""
    if isinstance(volumes, np.ndarray) and volumes.ndim == 3:
        # One volume: a view with the two new axes (no copy of 221 MB when it is already a
        # contiguous float32 array, as preprocess_volume returns it).
        return np.ascontiguousarray(volumes[None, None], dtype=np.float32)
    return np.ascontiguousarray(np.stack(list(volumes))[:, None], dtype=np.float32)

"""The straightforward reference the pipeline is measured against (README: "Baseline (a)").

What a research script does (CT-CLIP's own preprocessing on NIfTI works this way), only as
far as the benchmark studies need (one axial series, regular spacing). torch is a
benchmark dependency here, never a runtime one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from services.core.arrays import HuVolume, ModelVolume
from services.core.preprocessing import PreprocessingTarget


def read_series_plainly(files: Sequence[Path]) -> tuple[HuVolume, tuple[float, float, float]]:
    """HU stack (slices along the normal, ascending), and its (slice, row, column) spacing."""
    slices = []
    for path in files:
        dataset = pydicom.dcmread(path)
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        position = float(np.dot(normal, np.asarray(dataset.ImagePositionPatient, dtype=float)))
        hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(
            dataset.RescaleIntercept
        )
        slices.append((position, hu, [float(v) for v in dataset.PixelSpacing]))
    slices.sort(key=lambda item: item[0])
    volume = np.stack([hu for _, hu, _ in slices])
    slice_spacing = float(np.median(np.diff([position for position, _, _ in slices])))
    row_spacing, column_spacing = slices[0][2]
    return volume, (slice_spacing, row_spacing, column_spacing)


def preprocess_with_torch(
    hu: HuVolume, spacing_mm: Sequence[float], target: PreprocessingTarget
) -> ModelVolume:
    """The contract's preprocessing, CT-CLIP style, for an axial head-first-supine stack.

    ``hu[slice, row, column]`` runs toward superior, posterior, left: SLP+ is
    ``hu[slice, column, row]``.
    """
    slp = torch.from_numpy(hu).permute(0, 2, 1)
    spacing = (spacing_mm[0], spacing_mm[2], spacing_mm[1])
    slp = slp.clamp(*target.hu_window)
    size = [
        int(n * current / wanted)
        for n, current, wanted in zip(slp.shape, spacing, target.spacing_mm, strict=True)
    ]
    resized = F.interpolate(slp[None, None], size=size, mode="trilinear", align_corners=False)
    resized = resized[0, 0] / 1000.0
    output = torch.full(target.shape, -1.0)
    source, destination = [], []
    for n, wanted in zip(resized.shape, target.shape, strict=True):
        start = max((n - wanted) // 2, 0)
        before = max((wanted - n) // 2, 0)
        kept = min(n, wanted)
        source.append(slice(start, start + kept))
        destination.append(slice(before, before + kept))
    output[tuple(destination)] = resized[tuple(source)]
    return output.numpy()

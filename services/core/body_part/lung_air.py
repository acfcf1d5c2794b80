"""``lung_air``: find the lungs as large air-filled regions inside the body.

On every evaluated slice (the volume is downsampled to about 3 mm in-plane and 5 mm between
slices, which keeps the check far below a second):

1. air is everything below -400 HU; the body is the rest;
2. air connected to the edge of the image is outside the patient (room air, the gap to the
   table, the padding outside the reconstruction circle) and is discarded;
3. the enclosed air whose density is lung-like (-975..-400 HU after averaging) is lung. Pure
   gas (bowel, trachea, sinuses) sits near -1000 HU and falls below the window;
4. a slice "shows lungs" when that lung area is at least ``lung_min_area_fraction`` of the
   body area and at least 10 cm^2.

The volume shows a chest when lungs appear on at least ``lung_min_extent_fraction`` of the
slices, over at least half of the minimum chest coverage, with at least 250 ml of lung in
all: lung bases in a few slices of an abdomen scan, or the sinuses of a head scan, do not
make it a chest.

Limitation: lungs cut by a reconstruction field of view narrower than the chest touch the
image edge and are taken for outside air.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from services.core.arrays import BoolArray, Float32Array, Float64Array
from services.core.body_part.base import ImageAssessment
from services.core.config import ChestCheckSettings
from services.core.volume import Volume

AIR_BELOW_HU = -400.0
# Emphysematous lung averages below -950 HU; the lower bound leaves room for it while pure
# gas (about -1000 HU) stays out.
LUNG_MIN_HU = -975.0
TARGET_PIXEL_MM = 3.0
TARGET_SLICE_MM = 5.0
MAX_EVALUATED_SLICES = 128
MIN_LUNG_AREA_MM2 = 1000.0  # 10 cm^2 on one slice
# Even a child's lungs hold well over 500 ml; sinuses, mastoid cells and gas pockets in the
# bowel are tens of millilitres. The head fixture's sinuses measure about 40 ml.
MIN_LUNG_VOLUME_ML = 250.0


@dataclass
class LungAirDetector:
    min_area_fraction: float = 0.02
    min_extent_fraction: float = 0.3
    min_lung_extent_mm: float = 40.0
    name: str = "lung_air"

    @classmethod
    def from_settings(cls, settings: ChestCheckSettings) -> LungAirDetector:
        return cls(
            min_area_fraction=settings.lung_min_area_fraction,
            min_extent_fraction=settings.lung_min_extent_fraction,
            min_lung_extent_mm=0.5 * settings.min_coverage_mm,
        )

    def assess(self, volume: Volume) -> ImageAssessment:
        reduced, slice_mm, pixel_area_mm2 = downsample(volume)
        lung_area, body_area, lung_hu_sum = lung_areas(reduced)
        lung_area_mm2 = lung_area * pixel_area_mm2
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.where(body_area > 0, lung_area / np.maximum(body_area, 1), 0.0)
        has_lung = (fraction >= self.min_area_fraction) & (lung_area_mm2 >= MIN_LUNG_AREA_MM2)
        n_evaluated = int(reduced.shape[0])
        n_lung = int(has_lung.sum())
        slice_fraction = n_lung / n_evaluated if n_evaluated else 0.0
        lung_extent_mm = n_lung * slice_mm
        lung_volume_ml = float(lung_area_mm2.sum() * slice_mm / 1000.0)
        total_lung = float(lung_area.sum())
        mean_lung_hu = float(lung_hu_sum.sum() / total_lung) if total_lung else float("nan")
        is_chest = (
            slice_fraction >= self.min_extent_fraction
            and lung_extent_mm >= self.min_lung_extent_mm
            and lung_volume_ml >= MIN_LUNG_VOLUME_ML
        )
        summary = (
            f"lungs on {n_lung} of {n_evaluated} evaluated slices "
            f"({100 * slice_fraction:.0f}%, {lung_extent_mm:.0f} mm), about {lung_volume_ml:.0f} ml "
            f"of lung (a chest needs {100 * self.min_extent_fraction:.0f}% of slices, "
            f"{self.min_lung_extent_mm:.0f} mm and {MIN_LUNG_VOLUME_ML:.0f} ml)"
        )
        evidence: dict[str, float | int | str] = {
            "evaluated_slices": n_evaluated,
            "lung_slices": n_lung,
            "lung_slice_fraction": round(slice_fraction, 3),
            "lung_extent_mm": round(lung_extent_mm, 1),
            "lung_volume_ml": round(lung_volume_ml, 1),
            "max_lung_area_fraction": round(float(fraction.max()) if fraction.size else 0.0, 3),
            "evaluated_slice_spacing_mm": round(slice_mm, 2),
        }
        if not math.isnan(mean_lung_hu):
            evidence["mean_lung_hu"] = round(mean_lung_hu, 1)
        return ImageAssessment(is_chest=is_chest, summary=summary, evidence=evidence)


def downsample(volume: Volume) -> tuple[Float32Array, float, float]:
    """Every k-th slice, block-averaged in-plane to about 3 mm pixels.

    Returns the reduced array, the distance between evaluated slices (mm) and the area of
    one reduced pixel (mm^2). Averaging (not striding) keeps sharp-kernel noise from pushing
    lung pixels out of the density window.
    """
    slice_mm, row_mm, column_mm = volume.spacing_mm
    n_slices = volume.hu.shape[0]
    step = max(1, int(TARGET_SLICE_MM // slice_mm), math.ceil(n_slices / MAX_EVALUATED_SLICES))
    row_step = max(1, round(TARGET_PIXEL_MM / row_mm))
    column_step = max(1, round(TARGET_PIXEL_MM / column_mm))
    chosen = volume.hu[step // 2 :: step]
    rows = (chosen.shape[1] // row_step) * row_step
    columns = (chosen.shape[2] // column_step) * column_step
    blocks = chosen[:, :rows, :columns].reshape(
        chosen.shape[0], rows // row_step, row_step, columns // column_step, column_step
    )
    reduced = blocks.mean(axis=(2, 4), dtype=np.float32)
    return reduced, step * slice_mm, row_step * row_mm * column_step * column_mm


def lung_areas(reduced: Float32Array) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Per slice: lung pixel count, body pixel count (incl. enclosed air), lung HU sum."""
    body = reduced >= AIR_BELOW_HU
    filled = fill_holes_per_slice(body)
    enclosed_air = filled & ~body
    lung = enclosed_air & (reduced >= LUNG_MIN_HU)
    lung_area = lung.sum(axis=(1, 2)).astype(np.float64)
    body_area = filled.sum(axis=(1, 2)).astype(np.float64)
    lung_hu_sum = np.where(lung, reduced, 0.0).sum(axis=(1, 2), dtype=np.float64)
    return lung_area, body_area, lung_hu_sum


def fill_holes_per_slice(mask: BoolArray) -> BoolArray:
    """2D hole filling of every slice of a (slices, rows, columns) mask in one call.

    Hole filling in 3D would not work: the airway opens at the top of a chest scan and
    connects the lungs to the volume's edge. Slices are tiled into one tall 2D mosaic with
    a row of background between them; that row reaches the mosaic's left and right edges,
    so each slice's outside air stays connected to the edge, while air enclosed in one slice
    cannot reach another slice.
    """
    n_slices, rows, columns = mask.shape
    if n_slices == 0:
        return mask.copy()
    mosaic = np.zeros((n_slices, rows + 1, columns), dtype=np.uint8)
    mosaic[:, :rows, :] = mask
    image = sitk.GetImageFromArray(mosaic.reshape(n_slices * (rows + 1), columns))
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    result = sitk.GetArrayFromImage(filled).reshape(n_slices, rows + 1, columns)
    return result[:, :rows, :].astype(bool)

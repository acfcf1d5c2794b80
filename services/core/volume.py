"""A CT volume in patient geometry: the hand-off from DICOM reading to preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.arrays import HuVolume, LpsDirections, LpsVector


@dataclass(frozen=True)
class Volume:
    """Hounsfield units of one series on a regular grid, with its patient geometry (DICOM LPS).

    ``hu[k, r, c]`` is slice ``k`` (sorted by increasing position along
    ``slice_normal``), row ``r`` and column ``c`` of that slice's pixel data.
    """

    hu: HuVolume  # float32, shape (slices, rows, columns)
    row_cosine: LpsVector  # (3,) LPS direction of increasing column index (IOP[0:3])
    column_cosine: LpsVector  # (3,) LPS direction of increasing row index (IOP[3:6])
    slice_normal: LpsVector  # (3,) LPS direction of increasing slice index
    spacing_mm: tuple[float, float, float]  # (between slices, between rows, between columns)
    origin_mm: LpsVector  # (3,) LPS position of voxel [0, 0, 0]
    # Slices (axis 0) blended from their neighbours, not acquired: the viewer marks them.
    interpolated_slices: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        slices, rows, columns = self.hu.shape
        return (int(slices), int(rows), int(columns))

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        slices, rows, columns = self.shape
        return (
            slices * self.spacing_mm[0],
            rows * self.spacing_mm[1],
            columns * self.spacing_mm[2],
        )

    def axis_directions(self) -> LpsDirections:
        """3x3 matrix whose row ``i`` is the LPS direction of array axis ``i``."""
        return np.stack([self.slice_normal, self.column_cosine, self.row_cosine]).astype(np.float64)

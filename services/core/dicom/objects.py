"""DICOM domain objects: an Instance (one file's header), a Series, a Study.

They know their tags and files, nothing about tensors or models. Headers are read by
services/core/dicom/headers.py; pixel data only later, by volume_builder.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from services.core.arrays import LpsVector, Orientation, PositionsMm
from services.core.dicom import geometry
from services.core.dicom.values import int_or_none, tag_value, vector

# ImageType values of localizer (scout) images, by vendor: GE SCOUT, Siemens TOPOGRAM,
# Philips SURVIEW, Toshiba/Canon SCANOGRAM, and the standard LOCALIZER.
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"})


@dataclass
class Instance:
    """One DICOM file: its path and its header (the tags in HEADER_KEYWORDS, no pixel data).

    The parsed values are cached: sorting, selection and geometry ask for them many times
    per file, and pydicom converts a value again on every access. The header is not
    changed after reading, so the cache cannot go stale.
    """

    path: Path
    header: Dataset

    @cached_property
    def instance_number(self) -> int | None:
        return int_or_none(tag_value(self.header, "InstanceNumber"))

    @cached_property
    def position(self) -> LpsVector | None:
        return vector(tag_value(self.header, "ImagePositionPatient"), 3)

    @cached_property
    def orientation(self) -> Orientation | None:
        return vector(tag_value(self.header, "ImageOrientationPatient"), 6)

    @cached_property
    def n_frames(self) -> int:
        return int_or_none(tag_value(self.header, "NumberOfFrames")) or 1


@dataclass
class Series:
    """One series of a study, described by the tags that decide whether it can be used."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    instances: list[Instance]
    image_type: tuple[str, ...]
    sop_class_uid: str
    body_part_examined: str
    convolution_kernel: str
    slice_thickness: float | None
    protocol_name: str = ""
    patient_position: str = ""
    manufacturer: str = ""
    series_uid_missing: bool = False  # the files had no SeriesInstanceUID: a key was derived

    @property
    def n_images(self) -> int:
        return len(self.instances)

    @property
    def first_header(self) -> Dataset:
        return self.instances[0].header

    @property
    def is_localizer(self) -> bool:
        """A localizer (scout) by its ImageType; the description test is in selection."""
        return bool(LOCALIZER_IMAGE_TYPES & set(self.image_type))

    def orientation(self) -> Orientation | None:
        """The most common ImageOrientationPatient of the series (None if no instance has one)."""
        values = [inst.orientation for inst in self.instances if inst.orientation is not None]
        if not values:
            return None
        return geometry.most_common_orientation(np.stack(values))

    def positions_along_normal(self) -> PositionsMm | None:
        """Every instance's position along the series' slice normal (mm), None if unknown."""
        orientation = self.orientation()
        positions = [inst.position for inst in self.instances if inst.position is not None]
        if orientation is None or not positions:
            return None
        try:
            normal = geometry.slice_normal(orientation)
        except ValueError:  # parallel row and column vectors
            return None
        return geometry.positions_along(normal, np.stack(positions))

    def header_slice_spacing(self) -> float | None:
        """Median distance between neighbouring positions along the slice normal, from headers."""
        positions = self.positions_along_normal()
        if positions is None:
            return None
        gaps = np.diff(np.sort(positions))
        gaps = gaps[gaps > geometry.DUPLICATE_TOLERANCE_MM]
        return float(np.median(gaps)) if gaps.size else None

    def effective_thickness(self) -> float | None:
        """SliceThickness, or the spacing of the positions when the tag is absent."""
        return self.slice_thickness if self.slice_thickness else self.header_slice_spacing()


@dataclass
class Study:
    study_uid: str
    series: list[Series]
    study_description: str = ""
    study_uid_missing: bool = False  # the files had no StudyInstanceUID: a key was derived

    @property
    def n_images(self) -> int:
        return sum(series.n_images for series in self.series)

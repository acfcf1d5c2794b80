"""Data-quality flags: the classes of what was wrong with a study's data that a reader should
know at a glance (a chip in the worklist row, a filter), beside the warnings in words.

A flag says the result stands but was made from imperfect data; it never changes the call.
"""

from __future__ import annotations

from enum import Enum


class QualityFlag(str, Enum):
    INTERPOLATED = "interpolated"  # missing slices filled by interpolation
    UNEVEN_SPACING = "uneven_spacing"  # slice spacing not constant (resampled)
    GANTRY_TILT = "gantry_tilt"  # tilted acquisition (resampled onto an upright grid)
    LATE_INSTANCES = "late_instances"  # images arrived after the study was queued
    SERIES_CHOSEN = "series_chosen"  # one series read among several candidates


QUALITY_FLAG_TEXT = {
    QualityFlag.INTERPOLATED: "missing slices interpolated",
    QualityFlag.UNEVEN_SPACING: "uneven slice spacing",
    QualityFlag.GANTRY_TILT: "gantry tilt",
    QualityFlag.LATE_INSTANCES: "late images",
    QualityFlag.SERIES_CHOSEN: "one series of several",
}

"""bpreg's ``inference-settings.json`` as a pydantic model, the interpretation rules, a DEMO table.

The file (written by bpreg's model post-processing next to ``model.pt``) holds the lookup table
of landmark scores: for every annotated landmark (``pelvis_start``, vertebrae ``L5`` .. ``C1``,
``lung_start``, ``lung_end``, ``eyes_end``, ...) the mean and spread of the raw network score on
the training + validation scans (``lookuptable_train_val.original``) and the same after the
transform that puts the start landmark at 0 and the end landmark at 100 (``.transformed``);
the start / end landmark names (``settings``); the mean slope of a scan's transformed score
curve per mm (``slope_mean``) and the quantiles of the slope between neighbouring slices
(``lower_`` / ``upper_quantile_tangential_slope``). Other entries are accepted and ignored.

The rules that turn landmarks into body parts are bpreg's constants, not part of the file; they
are `InterpretationRules` here, with bpreg's values as defaults.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.core.arrays import Float64Array, FloatArray

TRANSFORMED_SCALE = 100.0
# bpreg rounds the transformed table to 3 decimals; its start / end landmarks sit at 0 / 100.
TRANSFORMED_TOLERANCE = 0.01


class LandmarkScore(BaseModel):
    model_config = ConfigDict(extra="ignore")

    mean: float
    std: float | None = None  # NaN for a landmark annotated once


class LandmarkTable(BaseModel):
    model_config = ConfigDict(extra="ignore")

    original: dict[str, LandmarkScore]
    transformed: dict[str, LandmarkScore] | None = None


class TransformLandmarks(BaseModel):
    """The ``settings`` block: which landmarks the transform maps to 0 and to 100."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    start_landmark: str = Field(alias="start-landmark")
    end_landmark: str = Field(alias="end-landmark")


class BprInferenceSettings(BaseModel):
    """What interpreting the scores of one bpreg model needs from its ``inference-settings.json``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    slope_mean: float = Field(gt=0, description="expected transformed score change per mm")
    lower_quantile_tangential_slope: float
    upper_quantile_tangential_slope: float
    lookuptable_train_val: LandmarkTable
    settings: TransformLandmarks
    # Ours, absent from bpreg's files: an invented table that goes with demo weights.
    demo: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> BprInferenceSettings:
        original = self.lookuptable_train_val.original
        for role, name in (
            ("start-landmark", self.settings.start_landmark),
            ("end-landmark", self.settings.end_landmark),
        ):
            if name not in original:
                raise ValueError(
                    f"settings.{role} {name!r} is not in lookuptable_train_val.original"
                )
            if not math.isfinite(original[name].mean):
                raise ValueError(f"lookuptable_train_val.original[{name!r}].mean is not finite")
        if self.transform_max == self.transform_min:
            raise ValueError("the start and end landmarks have the same score")
        if not self.lower_quantile_tangential_slope < self.upper_quantile_tangential_slope:
            raise ValueError(
                "lower_quantile_tangential_slope must be below upper_quantile_tangential_slope"
            )
        transformed = self.lookuptable_train_val.transformed
        if transformed is not None:
            for name, expected in (
                (self.settings.start_landmark, 0.0),
                (self.settings.end_landmark, TRANSFORMED_SCALE),
            ):
                got = transformed[name].mean if name in transformed else None
                if got is None or abs(got - expected) > TRANSFORMED_TOLERANCE:
                    raise ValueError(
                        f"lookuptable_train_val.transformed[{name!r}].mean is {got}, "
                        f"expected {expected} (the table does not match its transform)"
                    )
        return self

    @property
    def transform_min(self) -> float:
        """The raw score of the start landmark (maps to 0)."""
        return self.lookuptable_train_val.original[self.settings.start_landmark].mean

    @property
    def transform_max(self) -> float:
        """The raw score of the end landmark (maps to 100)."""
        return self.lookuptable_train_val.original[self.settings.end_landmark].mean

    def transform(self, raw_scores: FloatArray) -> Float64Array:
        """Raw network scores -> bpreg's scale (start landmark 0, end landmark 100)."""
        raw = np.asarray(raw_scores, dtype=np.float64)
        return (
            (raw - self.transform_min)
            * TRANSFORMED_SCALE
            / (self.transform_max - self.transform_min)
        )

    def landmark_scores(self) -> dict[str, float]:
        """Transformed mean score of every landmark with a finite one, lowest first.

        The file's ``transformed`` table when it has one (bpreg reads that), else computed.
        """
        transformed = self.lookuptable_train_val.transformed
        if transformed is not None:
            scores = {name: entry.mean for name, entry in transformed.items()}
        else:
            original = self.lookuptable_train_val.original
            names = list(original)
            values = self.transform(np.array([original[name].mean for name in names]))
            scores = dict(zip(names, (float(v) for v in values), strict=True))
        finite = {name: score for name, score in scores.items() if math.isfinite(score)}
        return dict(sorted(finite.items(), key=lambda item: item[1]))


class BodyPartRule(BaseModel):
    """A body part is in a scan when at least ``min_present`` of its landmarks are inside."""

    name: str
    landmarks: tuple[str, ...]
    min_present: int = Field(ge=1)
    # For short scans, each slice is given the part whose range (landmark, landmark) holds it.
    slice_range: tuple[str, str]


class InterpretationRules(BaseModel):
    """bpreg's constants for cleaning scores and naming body parts (its defaults, see
    bpreg/score_processing/scores.py and bodypartexamined_tag.py in MIC-DKFZ/BodyPartRegression).
    """

    model_config = ConfigDict(frozen=True)

    smoothing_sigma_mm: float = Field(default=10.0, gt=0)
    # Transformed scores of blank slices (all -1 after preprocessing) for bpreg's public model;
    # a score equal to one of these after rounding to 2 decimals is no anatomy.
    background_scores: tuple[float, ...] = (110.83, 6.14, 108.92, 6.22)
    # |observed slope / expected slope - 1| above this makes the slice spacing implausible.
    slope_ratio_tolerance: float = Field(default=0.28, gt=0)
    # A score within this distance of 0 (100) marks the start (end) landmark's slice, beyond
    # which tails with implausible slopes are dropped.
    boundary_tolerance: float = Field(default=10.0, gt=0)
    # Shorter scans are named by their slices' most frequent part instead of by landmarks.
    short_scan_mm: float = Field(default=100.0, ge=0)
    # Feet to head; a scan covering several is named by the span, head first (bpreg's tags).
    body_parts: tuple[BodyPartRule, ...] = (
        BodyPartRule(
            name="PELVIS",
            landmarks=("pelvis_start", "femur_end", "pelvis_end"),
            min_present=2,
            slice_range=("pelvis_start", "pelvis_end"),
        ),
        BodyPartRule(
            name="ABDOMEN",
            landmarks=("L5", "L4", "L3", "L2", "L1", "Th12", "Th11", "Th10", "Th9"),
            min_present=7,
            slice_range=("pelvis_end", "Th9"),
        ),
        BodyPartRule(
            name="CHEST",
            landmarks=tuple(f"Th{n}" for n in range(12, 0, -1)),
            min_present=9,
            slice_range=("Th9", "Th2"),
        ),
        BodyPartRule(
            name="NECK",
            landmarks=("Th3", "Th2", "Th1", "C7", "C6", "C5", "C4", "C3", "C2"),
            min_present=6,
            slice_range=("Th2", "C3"),
        ),
        BodyPartRule(
            name="HEAD",
            landmarks=("C3", "C2", "C1", "eyes_end"),
            min_present=3,
            slice_range=("C3", "head_end"),
        ),
    )
    # The chest is fully covered when the scan reaches below the lung base and above the apex.
    lung_base_landmark: str = "lung_start"
    lung_apex_landmark: str = "lung_end"

    def landmark_names(self) -> set[str]:
        names = {self.lung_base_landmark, self.lung_apex_landmark}
        for rule in self.body_parts:
            names.update(rule.landmarks)
            names.update(rule.slice_range)
        return names


def missing_landmarks(settings: BprInferenceSettings, rules: InterpretationRules) -> list[str]:
    """Landmarks the rules use that the lookup table lacks (sorted)."""
    return sorted(rules.landmark_names() - set(settings.landmark_scores()))


# ----------------------------------------------------------------------------------------- demo

# INVENTED transformed positions (0 = pelvis_start, 100 = eyes_end), roughly proportioned like
# an adult's spine; they come from no model and no data. They only give demo weights a table.
_DEMO_TRANSFORMED: dict[str, float] = {
    "pelvis_start": 0.0,
    "femur_end": 6.0,
    "pelvis_end": 18.0,
    "L5": 20.0,
    "L4": 24.0,
    "L3": 28.0,
    "L2": 32.0,
    "L1": 36.0,
    "kidney_start": 27.0,
    "liver_end": 33.0,
    "Th12": 40.0,
    "lung_start": 42.0,
    "Th11": 43.0,
    "Th10": 46.0,
    "Th9": 49.0,
    "Th8": 52.0,
    "Th7": 55.0,
    "Th6": 58.0,
    "Th5": 61.0,
    "Th4": 64.0,
    "Th3": 67.0,
    "Th2": 70.0,
    "Th1": 72.5,
    "lung_end": 74.0,
    "C7": 75.0,
    "C6": 77.0,
    "C5": 79.0,
    "C4": 81.0,
    "C3": 83.0,
    "C2": 85.5,
    "C1": 88.0,
    "eyes_end": 100.0,
    "head_end": 110.0,
}
DEMO_RAW_OFFSET = -2.0  # invented: raw score of pelvis_start in the demo table
DEMO_RAW_PER_UNIT = 0.01  # invented: raw score per transformed unit
DEMO_STD = 2.0
# The slope statistics bpreg writes when it skips measuring them
# (InferenceSettingsStorage in bpreg/inference/inference_settings.py).
BPREG_DEFAULT_SLOPE_MEAN = 0.118
BPREG_DEFAULT_LOWER_TANGENTIAL_SLOPE = -0.037
BPREG_DEFAULT_UPPER_TANGENTIAL_SLOPE = 0.25


def demo_inference_settings() -> BprInferenceSettings:
    """A DEMO ``inference-settings.json`` (``demo: true``): invented landmark scores.

    The slope statistics are bpreg's defaults. Nothing here is measured; never decide on it.
    """
    original = {
        name: LandmarkScore(
            mean=DEMO_RAW_OFFSET + DEMO_RAW_PER_UNIT * score, std=DEMO_RAW_PER_UNIT * DEMO_STD
        )
        for name, score in _DEMO_TRANSFORMED.items()
    }
    transformed = {
        name: LandmarkScore(mean=score, std=DEMO_STD) for name, score in _DEMO_TRANSFORMED.items()
    }
    return BprInferenceSettings(
        slope_mean=BPREG_DEFAULT_SLOPE_MEAN,
        lower_quantile_tangential_slope=BPREG_DEFAULT_LOWER_TANGENTIAL_SLOPE,
        upper_quantile_tangential_slope=BPREG_DEFAULT_UPPER_TANGENTIAL_SLOPE,
        lookuptable_train_val=LandmarkTable(original=original, transformed=transformed),
        settings=TransformLandmarks(start_landmark="pelvis_start", end_landmark="eyes_end"),
        demo=True,
    )


def inference_settings_json(settings: BprInferenceSettings) -> dict[str, Any]:
    """The document bpreg would read (aliases as in its files), plus our ``demo`` flag."""
    return settings.model_dump(mode="json", by_alias=True)

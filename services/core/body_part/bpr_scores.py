"""From body-part regression scores to anatomy: bpreg's score processing, in numpy.

Steps (after bpreg's ``Scores`` and ``BodyPartExaminedTag``, rewritten):

1. transform the raw scores so that the start landmark is 0 and the end landmark 100;
2. drop blank slices (a score equal to a known background score);
3. smooth along the body axis with a gaussian of ``smoothing_sigma_mm``. Unlike bpreg (a
   gaussian over slice indices, reflected at the ends) this is a gaussian-weighted local
   linear fit in mm: a straight score curve stays exactly straight up to its ends, and slices
   picked at uneven heights (`select_slices` adds the last slice) are weighted by distance;
4. beyond the start landmark (legs) and beyond the end landmark (above the eyes) the network
   is out of its training range: a step between neighbouring slices whose slope lies outside
   the training quantiles cuts off the tail beyond it;
5. fit a straight line (score per mm) to what is left. Slices are given feet to head, so the
   slope must be positive (else the slice order or patient orientation in the headers
   contradicts the images) and close to the model's mean slope (else the slice spacing in the
   headers is implausible): both give warnings;
6. a landmark is covered when the scan has scores below and above its score; a body part is
   present when enough of its landmarks are; a scan shorter than ``short_scan_mm`` (or with
   no part present) is named by the most frequent part of its slices;
7. the chest is fully covered when the scan reaches below the lung base and above the apex.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

from services.core.arrays import BprScores, BprSlices, Float64Array, FloatArray, PositionsMm
from services.core.body_part.bpr_input import (
    DEFAULT_MAX_SLICES,
    DEFAULT_SLICE_SPACING_MM,
    bpr_input,
    select_slices,
)
from services.core.body_part.bpr_settings import (
    BprInferenceSettings,
    InterpretationRules,
)
from services.core.schemas import BodyPartEvidence
from services.core.volume import Volume

# Network input [n, 1, 128, 128] float32 -> raw scores [n, 1] (onnxruntime, Triton, ...).
SliceScorer = Callable[[BprSlices], BprScores]

BACKGROUND_DECIMALS = 2
# Weights below this (about 6 sigma away) do not count as neighbours in the local fit.
NEGLIGIBLE_WEIGHT = 1e-8


def transform_scores(raw_scores: FloatArray, settings: BprInferenceSettings) -> Float64Array:
    """Raw network scores -> bpreg's scale (start landmark 0, end landmark 100)."""
    return settings.transform(raw_scores)


def remove_background(scores: Float64Array, background_scores: tuple[float, ...]) -> Float64Array:
    """NaN where a transformed score is a blank slice's (equal after rounding to 2 decimals)."""
    cleaned = np.array(scores, dtype=np.float64)
    blank = np.isin(np.round(cleaned, BACKGROUND_DECIMALS), np.asarray(background_scores))
    cleaned[blank] = np.nan
    return cleaned


def smooth_scores(scores: Float64Array, positions_mm: PositionsMm, sigma_mm: float) -> Float64Array:
    """Gaussian-weighted local linear fit at every finite score (NaN stays NaN)."""
    smoothed = np.array(scores, dtype=np.float64)
    valid = np.isfinite(smoothed)
    z, y = positions_mm[valid], smoothed[valid]
    if z.size < 2:
        return smoothed
    weights = np.exp(-0.5 * ((z[:, None] - z[None, :]) / sigma_mm) ** 2)
    weights[weights < NEGLIGIBLE_WEIGHT] = 0.0
    total = weights.sum(axis=1)
    mean_z = weights @ z / total
    mean_y = weights @ y / total
    centred_z = z[None, :] - mean_z[:, None]
    spread = np.sum(weights * centred_z**2, axis=1)
    covariance = np.sum(weights * centred_z * (y[None, :] - mean_y[:, None]), axis=1)
    # A point with no neighbour has no spread: its fit is its own value.
    has_spread = spread > 1e-12 * np.maximum(total, 1.0)
    slope = np.divide(covariance, spread, out=np.zeros_like(spread), where=has_spread)
    smoothed[valid] = mean_y + slope * (z - mean_z)
    return smoothed


def _nearest_within(values: Float64Array, target: float, tolerance: float) -> int | None:
    distance = np.abs(values - target)
    best = int(np.argmin(distance))
    return best if distance[best] < tolerance else None


def cut_outlier_tails(
    scores: Float64Array,
    positions_mm: PositionsMm,
    settings: BprInferenceSettings,
    rules: InterpretationRules,
) -> Float64Array:
    """NaN over the tails beyond the start / end landmark cut off by an implausible step.

    Works in the frame where scores rise: if they fall along ``positions_mm`` (reversed
    order), heights are negated first, so the same tails go.
    """
    cleaned = np.array(scores, dtype=np.float64)
    valid_index = np.flatnonzero(np.isfinite(cleaned))
    if valid_index.size < 2:
        return cleaned
    heights = positions_mm[valid_index]
    values = cleaned[valid_index]
    if _fit_line(heights, values)[0] < 0:
        heights = -heights
    order = np.argsort(heights, kind="stable")
    heights, values, valid_index = heights[order], values[order], valid_index[order]

    start = _nearest_within(values, 0.0, rules.boundary_tolerance)
    end = _nearest_within(values, 100.0, rules.boundary_tolerance)
    if start is not None and end is not None and start > end:
        start = None
    steps = np.diff(values) / np.maximum(np.diff(heights), np.finfo(float).tiny)
    implausible = np.flatnonzero(
        (steps < settings.lower_quantile_tangential_slope)
        | (steps > settings.upper_quantile_tangential_slope)
    )
    drop = np.zeros(values.size, dtype=bool)
    for step in implausible:  # the step joins points `step` and `step + 1`
        if start is not None and step + 1 <= start:
            drop[: step + 1] = True
        if end is not None and step >= end:
            drop[step + 1 :] = True
    cleaned[valid_index[drop]] = np.nan
    return cleaned


def _fit_line(x: Float64Array, y: Float64Array) -> tuple[float, float]:
    """Least-squares slope and intercept; NaN without two distinct x."""
    if x.size < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _landmarks_inside(values: Float64Array, landmark_scores: dict[str, float]) -> list[str]:
    """Landmarks with scan scores on both sides, lowest landmark first."""
    if values.size == 0:
        return []
    low, high = float(values.min()), float(values.max())
    return [name for name, score in landmark_scores.items() if low < score < high]


def _span_tag(parts_present: list[str], order: list[str]) -> str:
    """bpreg's tag for several parts: every part from the highest to the lowest present."""
    positions = [order.index(part) for part in parts_present]
    return "-".join(reversed(order[min(positions) : max(positions) + 1]))


def _most_frequent_slice_part(
    values: Float64Array, landmark_scores: dict[str, float], rules: InterpretationRules
) -> str | None:
    """The part whose (open) landmark range holds the most slices; first-seen wins a tie."""
    named: list[str] = []
    for value in values:
        for rule in rules.body_parts:
            low_name, high_name = rule.slice_range
            if low_name not in landmark_scores or high_name not in landmark_scores:
                continue
            if landmark_scores[low_name] < value < landmark_scores[high_name]:
                named.append(rule.name)
                break
    return Counter(named).most_common(1)[0][0] if named else None


class SlopeCheck(BaseModel):
    slope: float | None  # transformed score per mm; None without two usable slices
    ratio: float | None  # |slope| / expected
    plausible: bool | None
    reversed_order: bool | None
    warnings: list[str]


def check_slope(
    positions_mm: PositionsMm, scores: Float64Array, expected: float, rules: InterpretationRules
) -> SlopeCheck:
    """The fitted score slope against the model's mean slope (direction and spacing)."""
    slope, _intercept = _fit_line(positions_mm, scores)
    if not np.isfinite(slope):
        return SlopeCheck(slope=None, ratio=None, plausible=None, reversed_order=None, warnings=[])
    ratio = abs(slope) / expected
    plausible = abs(1.0 - ratio) <= rules.slope_ratio_tolerance
    warnings = []
    if slope < 0:
        warnings.append(
            f"body-part scores fall from the feet toward the head ({slope:.3f}/mm): the slice "
            "order or the patient orientation in the headers contradicts the images"
        )
    if not plausible:
        warnings.append(
            f"body-part scores change {abs(slope):.3f}/mm along the body axis, {ratio:.2f}x the "
            f"expected {expected:.3f}/mm: the slice spacing in the headers looks wrong "
            f"(the images suggest {ratio:.2f}x the stated spacing)"
        )
    return SlopeCheck(
        slope=slope, ratio=ratio, plausible=plausible, reversed_order=slope < 0, warnings=warnings
    )


def _reaches(values: Float64Array, landmark_score: float | None, *, below: bool) -> bool | None:
    """Whether the scan reaches below (above) the landmark; None when it is not in the table."""
    if landmark_score is None or values.size == 0:
        return None
    return bool(values.min() < landmark_score if below else values.max() > landmark_score)


def body_part_label(body_part: str) -> str:
    """bpreg's tag as people read it: ``NECK-CHEST`` -> ``NECK/CHEST``."""
    return body_part.replace("-", "/")


def shows_chest(body_part: str | None) -> bool:
    """Whether bpreg's tag names the chest (alone or within a span such as NECK-CHEST)."""
    return body_part is not None and "CHEST" in body_part.split("-")


def summarise(
    body_part: str | None,
    landmarks_covered: list[str],
    score_range: tuple[float, float] | None,
    lung_base_covered: bool | None,
    lung_apex_covered: bool | None,
) -> str:
    """One line: the part, the landmarks from first to last, and the chest's coverage."""
    if score_range is None:
        return "no body part recognised (no usable score)"
    if landmarks_covered:
        where = f"landmarks {landmarks_covered[0]}..{landmarks_covered[-1]}"
    else:
        where = f"no landmark inside; scores {score_range[0]:.0f}..{score_range[1]:.0f}"
    if body_part is None:
        return f"no body part recognised ({where})"
    text = f"{body_part_label(body_part)} ({where})"
    if not shows_chest(body_part):
        return text
    missing = [
        name
        for name, covered in (("lung base", lung_base_covered), ("lung apex", lung_apex_covered))
        if covered is False
    ]
    if missing:
        return f"{text}; {' and '.join(missing)} not covered"
    if lung_base_covered and lung_apex_covered:
        return f"{text}; chest fully covered (lung base to apex)"
    return text


def interpret(
    raw_scores: FloatArray | list[float],
    positions_mm: PositionsMm | list[float],
    settings: BprInferenceSettings,
    rules: InterpretationRules | None = None,
) -> BodyPartEvidence:
    """The evidence from raw network scores of slices at ``positions_mm``, feet to head.

    ``positions_mm`` are heights along the body axis according to the headers (for example
    `SliceSelection.positions_mm`); they must be increasing.
    """
    rules = rules or InterpretationRules()
    raw = np.asarray(raw_scores, dtype=np.float64).reshape(-1)
    z = np.asarray(positions_mm, dtype=np.float64).reshape(-1)
    if raw.size != z.size or raw.size == 0:
        raise ValueError(f"need one position per score, got {raw.size} scores, {z.size} positions")
    if np.any(np.diff(z) <= 0):
        raise ValueError("slice positions must increase (feet to head)")

    landmark_scores = settings.landmark_scores()
    warnings: list[str] = []
    missing = sorted(rules.landmark_names() - set(landmark_scores))
    if missing:
        warnings.append("the lookup table lacks the landmarks " + ", ".join(missing))
    if settings.demo:
        warnings.append("DEMO lookup table: the body-part evidence means nothing")

    transformed = transform_scores(raw, settings)
    cleaned = remove_background(transformed, rules.background_scores)
    cleaned = smooth_scores(cleaned, z, rules.smoothing_sigma_mm)
    cleaned = cut_outlier_tails(cleaned, z, settings, rules)
    usable = np.isfinite(cleaned)
    values = cleaned[usable]

    slope_check = check_slope(z[usable], values, settings.slope_mean, rules)
    warnings += slope_check.warnings
    if not usable.any():
        warnings.append("no slice has a usable body-part score")

    covered = _landmarks_inside(values, landmark_scores)
    present = [
        rule.name
        for rule in rules.body_parts
        if sum(name in covered for name in rule.landmarks) >= rule.min_present
    ]
    order = [rule.name for rule in rules.body_parts]
    if present and np.ptp(z) >= rules.short_scan_mm:
        body_part: str | None = _span_tag(present, order)
    else:
        body_part = _most_frequent_slice_part(values, landmark_scores, rules)

    base = _reaches(values, landmark_scores.get(rules.lung_base_landmark), below=True)
    apex = _reaches(values, landmark_scores.get(rules.lung_apex_landmark), below=False)
    score_range = (float(values.min()), float(values.max())) if values.size else None
    return BodyPartEvidence(
        summary=summarise(body_part, covered, score_range, base, apex),
        body_part=body_part,
        body_parts_present=present,
        landmarks_covered=covered,
        first_landmark=covered[0] if covered else None,
        last_landmark=covered[-1] if covered else None,
        lung_base_covered=base,
        lung_apex_covered=apex,
        chest_fully_covered=None if base is None or apex is None else base and apex,
        lowest_score=float(values.min()) if values.size else None,
        highest_score=float(values.max()) if values.size else None,
        observed_slope_per_mm=slope_check.slope,
        expected_slope_per_mm=settings.slope_mean,
        slope_ratio=slope_check.ratio,
        slope_plausible=slope_check.plausible,
        reversed_order=slope_check.reversed_order,
        positions_mm=[float(v) for v in z],
        transformed_scores=[float(v) for v in transformed],
        cleaned_scores=[float(v) if np.isfinite(v) else None for v in cleaned],
        warnings=warnings,
        demo=settings.demo,
    )


def evidence_for_volume(
    volume: Volume,
    score_slices: SliceScorer,
    settings: BprInferenceSettings,
    *,
    spacing_mm: float = DEFAULT_SLICE_SPACING_MM,
    max_slices: int | None = DEFAULT_MAX_SLICES,
    rules: InterpretationRules | None = None,
) -> BodyPartEvidence:
    """Select slices, build their network input, score them and interpret the scores."""
    selection = select_slices(volume, spacing_mm=spacing_mm, max_slices=max_slices)
    scores = np.asarray(score_slices(bpr_input(volume, selection.indices)))
    if scores.size != selection.indices.size:
        raise ValueError(
            f"the scorer gave {scores.size} scores for {selection.indices.size} slices"
        )
    return interpret(scores, selection.positions_mm, settings, rules)

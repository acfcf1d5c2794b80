"""Classification metrics, decision thresholds and their bootstrap confidence intervals.

Every metric is computed from *row weights*: the point estimate uses weight 1 per row, a
bootstrap resample uses how often each row was drawn. So one code path gives both, and all
resamples are computed at once (scores are sorted once, not once per resample).

* AUROC: the probability that a positive scores above a negative (ties count one half).
* AUPRC: average precision, sum over distinct thresholds of recall gain x precision.
* F1, sensitivity, specificity: at a threshold, a row is positive when its score >= threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

CONFIDENCE_LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
# Resamples are processed in blocks so that memory stays [block, rows] (CT-RATE: ~50k rows).
RESAMPLE_BLOCK = 100
METRIC_NAMES = ("auroc", "auprc", "f1", "sensitivity", "specificity")
# Scores, weights and metric values: float64 for the sums, float32 probabilities accepted.
Floats = NDArray[np.floating[Any]]
Labels = NDArray[np.integer[Any]]


@dataclass(frozen=True)
class _Groups:
    """Rows sorted by descending score, grouped by equal score."""

    order: NDArray[np.int64]
    starts: NDArray[np.int64]
    scores: Floats  # the score of each group, descending


def _group(scores: Floats) -> _Groups:
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return _Groups(order=order, starts=starts, scores=ordered[starts])


def _group_sums(weights: Floats, targets: Labels, groups: _Groups) -> tuple[Floats, Floats]:
    """Positive and negative weight per score group, ``[resamples, groups]`` each."""
    weighted = weights[:, groups.order]
    positive = targets[groups.order].astype(bool)
    positives = np.add.reduceat(np.where(positive, weighted, 0.0), groups.starts, axis=1)
    negatives = np.add.reduceat(np.where(positive, 0.0, weighted), groups.starts, axis=1)
    return positives, negatives


def _ratio(numerator: Floats, denominator: Floats) -> Floats:
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def weighted_metrics(
    targets: Labels, scores: Floats, threshold: float, weights: Floats
) -> dict[str, Floats]:
    """Each metric per weight row ``[resamples]``; NaN where undefined (e.g. no positive)."""
    groups = _group(scores)
    positives, negatives = _group_sums(weights, targets, groups)
    total_positive = positives.sum(axis=1)
    total_negative = negatives.sum(axis=1)
    true_positive_cum = np.cumsum(positives, axis=1)
    false_positive_cum = np.cumsum(negatives, axis=1)
    negatives_below = total_negative[:, None] - false_positive_cum
    auroc = _ratio(
        (positives * (negatives_below + 0.5 * negatives)).sum(axis=1),
        total_positive * total_negative,
    )
    precision = _ratio(true_positive_cum, true_positive_cum + false_positive_cum)
    auprc = _ratio(np.nansum(positives * precision, axis=1), total_positive)
    auprc[total_positive <= 0] = np.nan
    above = groups.scores >= threshold
    true_positive = positives[:, above].sum(axis=1)
    false_positive = negatives[:, above].sum(axis=1)
    false_negative = total_positive - true_positive
    true_negative = total_negative - false_positive
    return {
        "auroc": auroc,
        "auprc": auprc,
        "f1": _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
        "sensitivity": _ratio(true_positive, total_positive),
        "specificity": _ratio(true_negative, total_negative),
    }


def point_metrics(targets: Labels, scores: Floats, threshold: float) -> dict[str, float]:
    values = weighted_metrics(targets, scores, threshold, np.ones((1, len(targets))))
    return {name: float(value[0]) for name, value in values.items()}


def auroc(targets: Labels, scores: Floats) -> float | None:
    """AUROC, or None when only one class is present."""
    value = point_metrics(targets, scores, threshold=0.5)["auroc"]
    return None if np.isnan(value) else value


def roc_curve(targets: Labels, scores: Floats) -> tuple[Floats, Floats]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    groups = _group(scores)
    positives, negatives = _group_sums(np.ones((1, len(targets))), targets, groups)
    tpr = np.cumsum(positives[0]) / max(positives.sum(), 1)
    fpr = np.cumsum(negatives[0]) / max(negatives.sum(), 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


def precision_recall_curve(targets: Labels, scores: Floats) -> tuple[Floats, Floats]:
    """Recall and precision at every distinct threshold (highest threshold first)."""
    groups = _group(scores)
    positives, negatives = _group_sums(np.ones((1, len(targets))), targets, groups)
    true_positive = np.cumsum(positives[0])
    precision = true_positive / (true_positive + np.cumsum(negatives[0]))
    return true_positive / max(positives.sum(), 1), precision


def youden_threshold(targets: Labels, scores: Floats) -> float:
    """The score maximising sensitivity + specificity - 1 (the highest such score on ties)."""
    fpr, tpr = roc_curve(targets, scores)
    groups = _group(scores)
    return float(groups.scores[int(np.argmax(tpr[1:] - fpr[1:]))])


def sensitivity_threshold(targets: Labels, scores: Floats, target: float) -> float:
    """The highest score at which the sensitivity reaches ``target``."""
    _, tpr = roc_curve(targets, scores)
    groups = _group(scores)
    reached = np.flatnonzero(tpr[1:] >= target - 1e-12)
    return float(groups.scores[int(reached[0])])


class Estimate(BaseModel):
    value: float | None
    ci_low: float | None
    ci_high: float | None


def _estimate(point: float, resampled: Floats) -> Estimate:
    if np.isnan(point):
        return Estimate(value=None, ci_low=None, ci_high=None)
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0:
        return Estimate(value=point, ci_low=None, ci_high=None)
    tail = (1 - CONFIDENCE_LEVEL) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Estimate(value=point, ci_low=float(low), ci_high=float(high))


def bootstrap_weights(rows: int, resamples: int, seed: int) -> Floats:
    """How often each row is drawn in each resample, ``[resamples, rows]``."""
    generator = np.random.default_rng(seed)
    return generator.multinomial(rows, np.full(rows, 1.0 / rows), size=resamples).astype(float)


class LabelMetrics(BaseModel):
    n: int
    n_positive: int
    threshold: float
    auroc: Estimate
    auprc: Estimate
    f1: Estimate
    sensitivity: Estimate
    specificity: Estimate


@dataclass(frozen=True)
class BootstrapResult:
    """Per label and macro estimates; ``macro_resampled`` keeps each macro metric's value per
    resample (NaN where a label lost a class), so two heads scored on the same resamples can
    be compared pairwise (`paired_difference`)."""

    per_label: list[LabelMetrics]
    macro: dict[str, Estimate]
    macro_points: dict[str, float]  # NaN where undefined
    macro_resampled: dict[str, Floats]  # [resamples]


def _resampled_metrics(
    targets: NDArray[np.int8], scores: Floats, thresholds: list[float], weights: Floats
) -> dict[str, Floats]:
    """Each metric per resample and label, ``[resamples, labels]``."""
    resamples, n_labels = len(weights), targets.shape[1]
    resampled = {name: np.empty((resamples, n_labels)) for name in METRIC_NAMES}
    for start in range(0, resamples, RESAMPLE_BLOCK):
        block = weights[start : start + RESAMPLE_BLOCK]
        for j in range(n_labels):
            values = weighted_metrics(targets[:, j], scores[:, j], thresholds[j], block)
            for name in METRIC_NAMES:
                resampled[name][start : start + len(block), j] = values[name]
    return resampled


def _macro(points: list[float], resampled: Floats) -> tuple[float, Floats]:
    """The mean over the labels defined on the whole data, and per resample (NaN when one
    of those labels is undefined in the resample)."""
    defined = [j for j, point in enumerate(points) if not np.isnan(point)]
    if not defined:
        return float("nan"), np.full(len(resampled), np.nan)
    with np.errstate(all="ignore"):
        columns = resampled[:, defined]
        complete = np.isfinite(columns).all(axis=1)
        per_resample = np.where(complete, columns.mean(axis=1), np.nan)
    return float(np.mean([points[j] for j in defined])), per_resample


def bootstrap_metrics(
    targets: NDArray[np.int8],
    scores: Floats,
    thresholds: list[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> BootstrapResult:
    """Per column of ``targets``/``scores`` ``[rows, labels]``: every metric with its
    percentile bootstrap CI; and the macro average of each metric (over the labels where it is
    defined on the whole data) with a CI from the same resamples (rows are drawn jointly).
    The same ``rows``, ``resamples`` and ``seed`` give the same resamples."""
    rows, n_labels = targets.shape
    weights = bootstrap_weights(rows, resamples, seed)
    points = [point_metrics(targets[:, j], scores[:, j], thresholds[j]) for j in range(n_labels)]
    resampled = _resampled_metrics(targets, scores, thresholds, weights)
    per_label = [
        LabelMetrics(
            n=rows,
            n_positive=int(targets[:, j].sum()),
            threshold=thresholds[j],
            **{name: _estimate(points[j][name], resampled[name][:, j]) for name in METRIC_NAMES},
        )
        for j in range(n_labels)
    ]
    macro_points, macro_resampled, macro = {}, {}, {}
    for name in METRIC_NAMES:
        point, per_resample = _macro([p[name] for p in points], resampled[name])
        macro_points[name], macro_resampled[name] = point, per_resample
        macro[name] = _estimate(point, per_resample)
    return BootstrapResult(
        per_label=per_label,
        macro=macro,
        macro_points=macro_points,
        macro_resampled=macro_resampled,
    )


def paired_difference(first: BootstrapResult, second: BootstrapResult, metric: str) -> Estimate:
    """``first - second`` in a macro metric, with the percentile CI of the per-resample
    differences: a paired bootstrap, valid when both were computed on the same rows with the
    same resamples (same ``rows``, ``resamples`` and ``seed``)."""
    difference = first.macro_points[metric] - second.macro_points[metric]
    return _estimate(difference, first.macro_resampled[metric] - second.macro_resampled[metric])

"""From model probabilities to decisions: thresholds, the pathology flag, the most dangerous finding.

Thresholds come from the model repository's metadata and may be overridden in the
config (``inference.pathology_threshold``, ``inference.finding_thresholds``). A
finding is positive when its probability reaches its threshold (``>=``); the most
dangerous finding is the first positive one in the severity order. Findings the metadata
lists as ``not_assessed`` (a head trained without them) get no threshold and no result.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from services.core.config import InferenceSettings
from services.core.errors import ThresholdError
from services.core.model_metadata import ModelMetadata
from services.core.schemas import FindingResult

__all__ = ["ThresholdError", "Thresholds", "resolve_thresholds"]


@dataclass(frozen=True)
class Thresholds:
    pathology: float
    findings: dict[str, float]  # one per label the model assesses
    not_assessed: frozenset[str] = field(default_factory=frozenset)


def _check_probability_threshold(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ThresholdError(f"threshold for {name!r} must lie in [0, 1], got {value}")
    return value


def resolve_thresholds(metadata: ModelMetadata, settings: InferenceSettings) -> Thresholds:
    """The repository's default thresholds with the config's overrides applied."""
    unknown = sorted(set(settings.finding_thresholds) - set(metadata.labels))
    if unknown:
        raise ThresholdError(
            f"inference.finding_thresholds names unknown findings {unknown}; "
            f"the model's findings are: {', '.join(metadata.labels)}"
        )
    not_assessed = frozenset(metadata.not_assessed)
    overridden = sorted(not_assessed & set(settings.finding_thresholds))
    if overridden:
        raise ThresholdError(
            f"inference.finding_thresholds names {overridden}, which this model does not "
            "assess (metadata.json not_assessed)"
        )
    findings: dict[str, float] = {}
    for label in metadata.labels:
        if label in not_assessed:
            continue
        value = settings.finding_thresholds.get(label, metadata.finding_thresholds.get(label, 0.5))
        findings[label] = _check_probability_threshold(label, value)
    pathology = (
        metadata.pathology_threshold
        if settings.pathology_threshold is None
        else settings.pathology_threshold
    )
    return Thresholds(
        pathology=_check_probability_threshold("pathology", pathology),
        findings=findings,
        not_assessed=not_assessed,
    )


def pathology_flag(probability: float, threshold: float) -> int:
    """1 when P(pathology) reaches the threshold, else 0."""
    return int(float(probability) >= threshold)


def evaluate_findings(
    probabilities: Sequence[float],
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    not_assessed: Collection[str] = (),
) -> list[FindingResult]:
    """One FindingResult per assessed label, in the model's output order."""
    if len(probabilities) != len(labels):
        raise ValueError(
            f"the model returned {len(probabilities)} finding probabilities "
            f"for {len(labels)} labels"
        )
    return [
        FindingResult(
            label=label,
            probability=float(probability),
            threshold=float(thresholds[label]),
            positive=float(probability) >= thresholds[label],
        )
        for label, probability in zip(labels, probabilities, strict=True)
        if label not in not_assessed
    ]


def most_dangerous_finding(
    findings: Sequence[FindingResult], severity_order: Sequence[str]
) -> str | None:
    """The first positive finding in severity order, or None when nothing is positive."""
    positive = {finding.label for finding in findings if finding.positive}
    for label in severity_order:
        if label in positive:
            return label
    return None

"""Thresholds, the pathology flag and the most dangerous finding (pure logic)."""

from __future__ import annotations

import pytest

from services.core.config import InferenceSettings
from services.core.findings import (
    ThresholdError,
    evaluate_findings,
    most_dangerous_finding,
    pathology_flag,
    resolve_thresholds,
)
from services.core.labels import FINDING_LABELS, SEVERITY_ORDER
from services.core.model_metadata import ModelMetadata


def _metadata(**overrides) -> ModelMetadata:
    return ModelMetadata(
        demo=True, flavour="python", created_at="2026-01-01T00:00:00Z", **overrides
    )


def _probabilities(**by_label: float) -> list[float]:
    return [by_label.get(label, 0.0) for label in FINDING_LABELS]


def test_metadata_defaults_apply_without_overrides():
    metadata = _metadata(
        pathology_threshold=0.7,
        finding_thresholds={**{label: 0.5 for label in FINDING_LABELS}, "Cancer": 0.3},
    )
    thresholds = resolve_thresholds(metadata, InferenceSettings())
    assert thresholds.pathology == 0.7
    assert thresholds.findings["Cancer"] == 0.3
    assert thresholds.findings["Emphysema"] == 0.5
    assert list(thresholds.findings) == list(FINDING_LABELS)


def test_settings_override_metadata_thresholds():
    settings = InferenceSettings(pathology_threshold=0.2, finding_thresholds={"Lung nodule": 0.4})
    thresholds = resolve_thresholds(_metadata(), settings)
    assert thresholds.pathology == 0.2
    assert thresholds.findings["Lung nodule"] == 0.4
    assert thresholds.findings["Cancer"] == 0.5


def test_unknown_finding_in_settings_is_a_clear_error():
    settings = InferenceSettings(finding_thresholds={"Lung nodules": 0.4})
    with pytest.raises(ThresholdError, match="unknown findings \\['Lung nodules'\\]"):
        resolve_thresholds(_metadata(), settings)


def test_threshold_outside_unit_interval_is_rejected():
    with pytest.raises(ThresholdError, match="Cancer"):
        resolve_thresholds(_metadata(), InferenceSettings(finding_thresholds={"Cancer": 1.5}))
    with pytest.raises(ThresholdError, match="pathology"):
        resolve_thresholds(_metadata(), InferenceSettings(pathology_threshold=-0.1))


def test_pathology_flag_is_inclusive_at_the_threshold():
    assert pathology_flag(0.5, 0.5) == 1
    assert pathology_flag(0.4999, 0.5) == 0
    assert pathology_flag(0.9, 0.95) == 0


def test_findings_keep_model_order_and_mark_positives():
    thresholds = {label: 0.5 for label in FINDING_LABELS}
    thresholds["Emphysema"] = 0.8
    findings = evaluate_findings(
        _probabilities(Emphysema=0.7, Cardiomegaly=0.5), FINDING_LABELS, thresholds
    )
    assert [finding.label for finding in findings] == list(FINDING_LABELS)
    by_label = {finding.label: finding for finding in findings}
    assert by_label["Cardiomegaly"].positive  # equal to its threshold
    assert not by_label["Emphysema"].positive  # below its own, higher threshold
    assert by_label["Emphysema"].threshold == 0.8


def test_findings_count_must_match_labels():
    with pytest.raises(ValueError, match="19 finding probabilities for 20 labels"):
        evaluate_findings([0.1] * 19, FINDING_LABELS, {label: 0.5 for label in FINDING_LABELS})


def test_most_dangerous_follows_severity_not_probability():
    thresholds = {label: 0.5 for label in FINDING_LABELS}
    findings = evaluate_findings(
        _probabilities(**{"Medical material": 0.99, "Pleural effusion": 0.51, "Emphysema": 0.9}),
        FINDING_LABELS,
        thresholds,
    )
    assert most_dangerous_finding(findings, SEVERITY_ORDER) == "Pleural effusion"


def test_most_dangerous_is_none_when_nothing_is_positive():
    thresholds = {label: 0.5 for label in FINDING_LABELS}
    findings = evaluate_findings(_probabilities(Cancer=0.49), FINDING_LABELS, thresholds)
    assert most_dangerous_finding(findings, SEVERITY_ORDER) is None


def test_each_label_wins_when_it_is_the_only_positive():
    thresholds = {label: 0.5 for label in FINDING_LABELS}
    for label in FINDING_LABELS:
        findings = evaluate_findings(_probabilities(**{label: 0.6}), FINDING_LABELS, thresholds)
        assert most_dangerous_finding(findings, SEVERITY_ORDER) == label


def test_severity_order_from_metadata_is_respected():
    reversed_order = list(reversed(SEVERITY_ORDER))
    thresholds = {label: 0.5 for label in FINDING_LABELS}
    findings = evaluate_findings(
        _probabilities(Cancer=0.9, **{"Medical material": 0.9}), FINDING_LABELS, thresholds
    )
    assert most_dangerous_finding(findings, reversed_order) == "Medical material"


def test_findings_not_assessed_get_no_threshold_no_result_and_are_never_the_most_dangerous():
    assessed = {label: 0.5 for label in FINDING_LABELS if label not in ("COVID-19", "Cancer")}
    metadata = _metadata(finding_thresholds=assessed, not_assessed=["COVID-19", "Cancer"])
    thresholds = resolve_thresholds(metadata, InferenceSettings())
    assert "Cancer" not in thresholds.findings
    assert thresholds.not_assessed == {"COVID-19", "Cancer"}
    # The graph outputs a constant for them; even a high one must not count.
    probabilities = _probabilities(Cancer=0.99, Emphysema=0.8)
    findings = evaluate_findings(
        probabilities, FINDING_LABELS, thresholds.findings, thresholds.not_assessed
    )
    assert [finding.label for finding in findings] == list(assessed)
    assert most_dangerous_finding(findings, SEVERITY_ORDER) == "Emphysema"
    with pytest.raises(ThresholdError, match="does not assess"):
        resolve_thresholds(metadata, InferenceSettings(finding_thresholds={"Cancer": 0.4}))
    with pytest.raises(ValueError, match="cannot have a threshold"):
        _metadata(not_assessed=["Cancer"])  # the default thresholds name every label

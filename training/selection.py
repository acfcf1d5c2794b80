"""Keeping the MLP or the linear probe: the ``--head mlp|linear|best`` rule.

``best`` keeps the MLP only when it beats the linear probe on the validation rows beyond
their noise: the paired bootstrap CI (`SELECTION_RESAMPLES` resamples of the validation
rows, both heads scored on each) of the MLP's AUROC minus the probe's (multilabel: macro
AUROC) lies entirely above 0. Otherwise the probe. Why not simply the higher score: the MLP's
validation AUROC is the best of every epoch (early stopping) and, with ``--trials``, of every
design, all measured on those same rows, so it is biased upwards, most on the small
validation splits where the probe matters most; and when the two cannot be told apart the
simpler head generalises at least as well. ``mlp`` and ``linear`` keep that head whatever
the scores.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from convertation.head.selection import (
    AurocDifference,
    HeadKind,
    HeadRule,
    HeadSelection,
    LinearProbeCandidate,
    MlpCandidate,
)
from training.metrics import CONFIDENCE_LEVEL, bootstrap_metrics, paired_difference
from training.probe import ProbeFit
from training.search import SearchResult

SELECTION_RESAMPLES = 1000
NO_THRESHOLD = 0.5  # the threshold metrics of the bootstrap are not used here


def _mlp_candidate(search: SearchResult) -> MlpCandidate:
    return MlpCandidate(
        validation_auroc=search.fit.validation_auroc,
        hidden_sizes=search.fit.head.architecture.hidden_sizes,
        trials=search.trials,
        best_trial=search.best_trial + 1,
        best_epoch=search.fit.best_epoch,
    )


def _probe_candidate(probe: ProbeFit, labels: list[str]) -> LinearProbeCandidate:
    return LinearProbeCandidate(
        validation_auroc=probe.validation_auroc,
        regularisation_c={
            label: label_probe.c
            for label, label_probe in zip(labels, probe.label_probes, strict=True)
        },
    )


def validation_difference(
    targets: NDArray[np.int8],
    mlp_probabilities: NDArray[np.float32],
    probe_probabilities: NDArray[np.float32],
    *,
    seed: int,
) -> AurocDifference:
    """MLP minus probe in (macro) AUROC on the validation rows ``targets`` ``[n, labels]``,
    paired bootstrap: both heads on the same resamples."""
    thresholds = [NO_THRESHOLD] * targets.shape[1]
    results = [
        bootstrap_metrics(
            targets, probabilities, thresholds, resamples=SELECTION_RESAMPLES, seed=seed
        )
        for probabilities in (mlp_probabilities, probe_probabilities)
    ]
    difference = paired_difference(results[0], results[1], "auroc")
    return AurocDifference(
        value=difference.value if difference.value is not None else float("nan"),
        ci_low=difference.ci_low,
        ci_high=difference.ci_high,
        confidence_level=CONFIDENCE_LEVEL,
        resamples=SELECTION_RESAMPLES,
    )


def _interval(difference: AurocDifference) -> str:
    if difference.ci_low is None or difference.ci_high is None:
        return f"{difference.value:+.4f} (no CI: a resample lost a class)"
    return f"{difference.value:+.4f} (95% CI {difference.ci_low:+.4f} to {difference.ci_high:+.4f})"


def _choice(rule: HeadRule, difference: AurocDifference | None) -> tuple[HeadKind, str]:
    if rule == "mlp":
        return "mlp", "--head mlp"
    if rule == "linear" or difference is None:
        return "linear_probe", "--head linear"
    interval = _interval(difference)
    if difference.ci_low is not None and difference.ci_low > 0:
        return "mlp", f"MLP minus linear probe on validation: {interval}, above 0"
    return "linear_probe", (
        f"MLP minus linear probe on validation: {interval}, not above 0: the simpler head"
    )


def select_head(
    rule: HeadRule,
    search: SearchResult | None,
    probe: ProbeFit,
    labels: list[str],
    validation_targets: NDArray[np.int8],
    *,
    seed: int,
) -> HeadSelection:
    """The record of which head the run keeps and why (``search`` None: no MLP trained).
    ``validation_targets``: ``[n_validation, labels]``."""
    difference = None
    if search is not None:
        difference = validation_difference(
            validation_targets,
            search.fit.validation_probabilities,
            probe.validation_probabilities,
            seed=seed,
        )
    chosen, reason = _choice(rule, difference)
    return HeadSelection(
        rule=rule,
        chosen=chosen,
        reason=reason,
        mlp=None if search is None else _mlp_candidate(search),
        linear_probe=_probe_candidate(probe, labels),
        validation_difference=difference,
    )

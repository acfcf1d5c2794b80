"""The chosen head beside the run's linear probe, on the same held-out rows.

``evaluate`` loads the probe that ``train`` kept in ``RUN_DIR/linear_probe`` and scores it on
the rows the chosen head is scored on, with the same bootstrap resamples (same rows, count
and seed). That pairs every resample: the difference in AUROC (binary) or macro AUROC
(multilabel) is computed per resample, and its percentile interval is the paired bootstrap
CI of "chosen minus probe". When the chosen head *is* the probe the two give the same
probabilities and the difference is exactly 0; the report says so.

A run trained before the probe was built in has no ``linear_probe`` folder: no comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from convertation.head.configurable import HEAD_INFO_FILE, HeadRunInfo, load_trained_head
from convertation.head.selection import LINEAR_PROBE_DIR, HeadKind, HeadSelection
from training.fit import predict_probabilities
from training.metrics import BootstrapResult, Estimate, bootstrap_metrics, paired_difference

PAIRED_METHOD = "paired percentile bootstrap (the same resamples for both heads)"
HEAD_NAMES: dict[str, str] = {"mlp": "MLP", "linear_probe": "linear probe", "unknown": "head"}


class HeadScores(BaseModel):
    """One head on the held-out rows: AUROC and AUPRC (macro for multilabel) with CIs."""

    auroc: Estimate
    auprc: Estimate
    validation_auroc: float | None  # from head.json's selection (None: not recorded)
    per_label_auroc: dict[str, Estimate] = {}  # multilabel only


class BaselineComparison(BaseModel):
    """``metrics.json``'s ``baseline``."""

    chosen_head: HeadKind | Literal["unknown"]  # unknown: head.json has no selection record
    selection_reason: str | None
    metric: Literal["auroc", "macro_auroc"]
    method: str
    chosen: HeadScores
    linear_probe: HeadScores
    difference_auroc: Estimate  # chosen minus probe
    note: str


def _scores(
    result: BootstrapResult, labels: list[str], validation_auroc: float | None
) -> HeadScores:
    per_label = {}
    if len(labels) > 1:
        per_label = {
            name: label.auroc for name, label in zip(labels, result.per_label, strict=True)
        }
    return HeadScores(
        auroc=result.macro["auroc"],
        auprc=result.macro["auprc"],
        validation_auroc=validation_auroc,
        per_label_auroc=per_label,
    )


def _validation_auroc(selection: HeadSelection | None, head: str) -> float | None:
    """The validation score ``train`` recorded for ``head`` (None: not recorded)."""
    if selection is None:
        return None
    if head == "linear_probe":
        return selection.linear_probe.validation_auroc
    return None if selection.mlp is None else selection.mlp.validation_auroc


def _note(chosen: str, difference: Estimate) -> str:
    if chosen == "linear_probe":
        return "The chosen head is the linear probe: the difference is 0."
    if difference.ci_low is not None and difference.ci_low > 0:
        return "The chosen head is better than the linear probe (the CI lies above 0)."
    if difference.ci_high is not None and difference.ci_high < 0:
        return "The chosen head is worse than the linear probe (the CI lies below 0)."
    return "No difference shown between the chosen head and the linear probe (the CI holds 0)."


def compare_with_linear_probe(
    run: Path,
    info: HeadRunInfo,
    chosen: BootstrapResult,
    vectors: NDArray[np.float32],
    targets: NDArray[np.int8],
    *,
    resamples: int,
    seed: int,
) -> BaselineComparison | None:
    """The probe of ``run`` on ``vectors``/``targets`` beside ``chosen`` (computed on the same
    rows with ``resamples`` and ``seed``); None when the run has no probe."""
    folder = run / LINEAR_PROBE_DIR
    if not (folder / HEAD_INFO_FILE).is_file():
        return None
    probe, probe_info = load_trained_head(folder)
    probabilities = predict_probabilities(probe, vectors)
    probe_result = bootstrap_metrics(
        targets,
        probabilities,
        [probe_info.thresholds[name] for name in probe_info.labels],
        resamples=resamples,
        seed=seed,
    )
    selection = info.selection
    chosen_head = "unknown" if selection is None else selection.chosen
    difference = paired_difference(chosen, probe_result, "auroc")
    return BaselineComparison(
        chosen_head=chosen_head,
        selection_reason=None if selection is None else selection.reason,
        metric="auroc" if info.task == "binary" else "macro_auroc",
        method=PAIRED_METHOD,
        chosen=_scores(chosen, info.labels, _validation_auroc(selection, chosen_head)),
        linear_probe=_scores(
            probe_result, probe_info.labels, _validation_auroc(selection, "linear_probe")
        ),
        difference_auroc=difference,
        note=_note(chosen_head, difference),
    )


def _cell(estimate: Estimate, signed: bool = False) -> str:
    """``value (low-high)`` like the report's main table; signed values as ``+a (+b to +c)``."""
    if estimate.value is None:
        return "n/a"
    if not signed:
        return (
            f"{estimate.value:.3f}"
            if estimate.ci_low is None or estimate.ci_high is None
            else f"{estimate.value:.3f} ({estimate.ci_low:.3f}-{estimate.ci_high:.3f})"
        )
    if estimate.ci_low is None or estimate.ci_high is None:
        return f"{estimate.value:+.3f}"
    return f"{estimate.value:+.3f} ({estimate.ci_low:+.3f} to {estimate.ci_high:+.3f})"


def comparison_lines(comparison: BaselineComparison | None) -> list[str]:
    """The report's section: a table of both heads and their paired difference."""
    lines = ["## Chosen head and linear probe", ""]
    if comparison is None:
        return [
            *lines,
            "This run has no linear probe (`linear_probe/`: runs trained before it was built "
            "in): no side-by-side comparison.",
            "",
        ]
    macro = "" if comparison.metric == "auroc" else "macro "
    chosen_name = HEAD_NAMES[comparison.chosen_head]
    validation = [
        "n/a" if scores.validation_auroc is None else f"{scores.validation_auroc:.3f}"
        for scores in (comparison.chosen, comparison.linear_probe)
    ]
    reason = f" ({comparison.selection_reason})" if comparison.selection_reason else ""
    return [
        *lines,
        f"Kept: the {chosen_name}{reason}. {comparison.note}",
        "",
        f"| head | validation {macro}AUROC | held-out {macro}AUROC (95% CI) "
        f"| held-out {macro}AUPRC (95% CI) |",
        "|---|---|---|---|",
        f"| chosen: {chosen_name} | {validation[0]} | {_cell(comparison.chosen.auroc)} | "
        f"{_cell(comparison.chosen.auprc)} |",
        f"| linear probe | {validation[1]} | {_cell(comparison.linear_probe.auroc)} | "
        f"{_cell(comparison.linear_probe.auprc)} |",
        f"| difference, chosen - probe | | {_cell(comparison.difference_auroc, signed=True)} | |",
        "",
        f"The difference's CI: {comparison.method}.",
        "",
    ]

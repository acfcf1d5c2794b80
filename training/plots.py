"""ROC and precision-recall curves as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.metrics import Floats, Labels, precision_recall_curve, roc_curve

FIGURE_SIZE = (6.5, 6.0)
DPI = 110
# Beyond this many curves the legend would hide the plot; it moves outside then.
LEGEND_INSIDE_MAX = 4


def _axes(n_curves: int):
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    # tab20 keeps 18-20 findings apart; the default cycle repeats after ten.
    colours = plt.get_cmap("tab20")
    axes.set_prop_cycle(color=[colours(i % colours.N) for i in range(max(n_curves, 1))])
    return figure, axes


def _finish(axes, figure, path: Path, n_curves: int) -> Path:
    if n_curves > LEGEND_INSIDE_MAX:
        axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _assessed(
    curves: dict[str, tuple[Labels, Floats]], values: dict[str, float | None]
) -> Iterator[tuple[str, Labels, Floats, float]]:
    """Each label's ``targets``, ``scores`` and value, for the labels that have a value (one
    with a single class in the data has none, and no curve)."""
    for name, (targets, scores) in curves.items():
        value = values[name]
        if value is not None:
            yield name, targets, scores, value


def plot_roc(
    curves: dict[str, tuple[Labels, Floats]],
    aurocs: dict[str, float | None],
    path: Path,
) -> Path:
    """One ROC curve per label (``targets``, ``scores``), AUROC in the legend."""
    figure, axes = _axes(len(curves))
    for name, targets, scores, auroc in _assessed(curves, aurocs):
        fpr, tpr = roc_curve(targets, scores)
        axes.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUROC {auroc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    axes.set(
        xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01)
    )
    return _finish(axes, figure, path, len(curves))


def plot_precision_recall(
    curves: dict[str, tuple[Labels, Floats]],
    auprcs: dict[str, float | None],
    path: Path,
) -> Path:
    """One precision-recall curve per label, AUPRC (average precision) in the legend."""
    figure, axes = _axes(len(curves))
    for name, targets, scores, auprc in _assessed(curves, auprcs):
        recall, precision = precision_recall_curve(targets, scores)
        axes.step(
            np.r_[0.0, recall],
            np.r_[precision[0], precision],
            where="post",
            linewidth=1.2,
            label=f"{name} (AUPRC {auprc:.3f}, prevalence {targets.mean():.2f})",
        )
    axes.set(
        xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01)
    )
    return _finish(axes, figure, path, len(curves))

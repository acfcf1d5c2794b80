"""``python -m training evaluate``: a trained head on held-out rows, with bootstrap CIs.

Held out = every matched row whose name is *not* listed as a training or validation row in
the run's ``split.json``: on the training file that is the ``--test-fraction`` part, on
another file (e.g. CT-RATE's validation set) every row. The decision thresholds are chosen on
the run's validation rows (``validation.npz``), never on the rows being evaluated, and are
written back into the run's ``head.json`` so that the builder deploys them.

The run's linear probe (``RUN_DIR/linear_probe``) is scored on the same rows with the same
resamples, beside the chosen head: ``metrics.json``'s ``baseline`` and a table in
``report.md`` (`training.baseline`).

Writes ``DIR/metrics.json``, ``DIR/report.md``, ``DIR/roc.png``, ``DIR/pr.png`` and
``DIR/predictions.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from loguru import logger
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from convertation.head.configurable import (
    HeadRunError,
    HeadRunInfo,
    load_trained_head,
    write_run_info,
)
from training.baseline import BaselineComparison, compare_with_linear_probe, comparison_lines
from training.data import MatchedData, TrainingInputError, load_matched
from training.fit import predict_probabilities
from training.metrics import (
    CONFIDENCE_LEVEL,
    DEFAULT_RESAMPLES,
    METRIC_NAMES,
    Estimate,
    LabelMetrics,
    bootstrap_metrics,
    sensitivity_threshold,
)
from training.plots import plot_precision_recall, plot_roc
from training.train import (
    FALLBACK_THRESHOLD,
    SPLIT_FILE,
    VALIDATION_FILE,
    YOUDEN,
    choose_thresholds,
)


class EvaluateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: Path
    embeddings: Path
    labels: Path
    output: Path
    target_sensitivity: float | None = Field(default=None, gt=0, le=1)
    seed: int = 0
    resamples: int = Field(default=DEFAULT_RESAMPLES, gt=0)


def _used_in_training(run: Path) -> set[str]:
    path = run / SPLIT_FILE
    if not path.is_file():
        raise HeadRunError(f"{path} not found: the run does not say which rows trained it")
    split = json.loads(path.read_text())
    return set(split["train"]) | set(split["validation"])


def _targets(info: HeadRunInfo, data: MatchedData) -> NDArray[np.int8]:
    """``[n, labels]`` targets of the head's outputs from the CSV's finding columns."""
    needed = info.target_findings if info.task == "binary" else info.labels
    missing = [name for name in needed if name not in data.label_names]
    if missing:
        raise TrainingInputError(f"the labels CSV lacks the head's finding column(s) {missing}")
    columns = data.labels[:, [data.label_names.index(name) for name in needed]]
    if info.task == "binary":
        return (columns.max(axis=1) > 0).astype(np.int8)[:, None]
    return columns


def decision_thresholds(
    info: HeadRunInfo, run: Path, target_sensitivity: float | None
) -> tuple[dict[str, float], str]:
    """Thresholds per label from the run's validation rows, and the method's name."""
    path = run / VALIDATION_FILE
    if not path.is_file():
        raise HeadRunError(f"{path} not found: thresholds are chosen on the validation rows")
    with np.load(path, allow_pickle=False) as stored:
        targets, probabilities = stored["targets"], stored["probabilities"]
    if target_sensitivity is None:
        return choose_thresholds(info.labels, targets, probabilities), YOUDEN
    thresholds = {}
    for j, name in enumerate(info.labels):
        if targets[:, j].min() == targets[:, j].max():
            thresholds[name] = FALLBACK_THRESHOLD
        else:
            thresholds[name] = sensitivity_threshold(
                targets[:, j], probabilities[:, j], target_sensitivity
            )
    return thresholds, f"sensitivity>={target_sensitivity:.2f}"


def _format(estimate: Estimate) -> str:
    if estimate.value is None:
        return "n/a"
    if estimate.ci_low is None or estimate.ci_high is None:
        return f"{estimate.value:.3f}"
    return f"{estimate.value:.3f} ({estimate.ci_low:.3f}-{estimate.ci_high:.3f})"


def _report(
    metrics: dict[str, Any],
    per_label: dict[str, LabelMetrics],
    comparison: BaselineComparison | None,
    options: EvaluateOptions,
) -> str:
    lines = [
        f"# Evaluation of `{options.run.name}` ({metrics['task']} head)",
        "",
        f"Held-out studies: {metrics['rows']['held_out']} from `{options.embeddings.name}` "
        f"({metrics['rows']['used_in_training']} matched rows left out: they trained or "
        "validated the head).",
        f"Thresholds: {metrics['threshold_method']}, chosen on the run's validation rows.",
        f"95% CIs: percentile bootstrap, {options.resamples} resamples, seed {options.seed}.",
        "",
        "| label | n pos | threshold | " + " | ".join(METRIC_NAMES) + " |",
        "|---|---|---|" + "---|" * len(METRIC_NAMES),
    ]
    for name, label in per_label.items():
        cells = [_format(getattr(label, metric)) for metric in METRIC_NAMES]
        lines.append(
            f"| {name} | {label.n_positive} | {label.threshold:.3f} | " + " | ".join(cells) + " |"
        )
    if len(per_label) > 1:
        cells = [_format(Estimate(**metrics[metric])) for metric in METRIC_NAMES]
        lines.append("| **macro** | | | " + " | ".join(cells) + " |")
    lines += ["", *comparison_lines(comparison), "![ROC](roc.png) ![PR](pr.png)", ""]
    return "\n".join(lines)


def evaluate(options: EvaluateOptions) -> dict[str, Any]:
    """Metrics of the run's head on the held-out rows; thresholds stored back into the run."""
    head, info = load_trained_head(options.run)
    used = _used_in_training(options.run)
    data = load_matched(options.embeddings, options.labels)
    if data.vectors.shape[1] != head.embedding_dim:
        raise TrainingInputError(
            f"embeddings have {data.vectors.shape[1]} dimensions, the head takes {head.embedding_dim}"
        )
    held = np.array([key not in used for key in data.keys])
    logger.info(
        "rows: {}; {} used in training, {} held out",
        data.report.model_dump(),
        int((~held).sum()),
        int(held.sum()),
    )
    if not held.any():
        raise TrainingInputError(
            "no held-out rows: every matched row trained or validated this head "
            "(train with --test-fraction, or evaluate on another file)"
        )
    targets = _targets(info, data)[held]
    defined = [j for j in range(targets.shape[1]) if targets[:, j].min() != targets[:, j].max()]
    if not defined:
        raise TrainingInputError(
            f"the {int(held.sum())} held-out studies hold a single class for every label"
        )
    probabilities = predict_probabilities(head, data.vectors[held])
    thresholds, method = decision_thresholds(info, options.run, options.target_sensitivity)
    write_run_info(
        options.run, info.model_copy(update={"thresholds": thresholds, "threshold_method": method})
    )
    logger.info("thresholds ({}) stored in {}: {}", method, options.run / "head.json", thresholds)

    result = bootstrap_metrics(
        targets,
        probabilities,
        [thresholds[name] for name in info.labels],
        resamples=options.resamples,
        seed=options.seed,
    )
    label_metrics, macro = result.per_label, result.macro
    per_label = dict(zip(info.labels, label_metrics, strict=True))
    comparison = compare_with_linear_probe(
        options.run,
        info,
        result,
        data.vectors[held],
        targets,
        resamples=options.resamples,
        seed=options.seed,
    )
    metrics: dict[str, Any] = {
        "task": info.task,
        "run": str(options.run),
        "rows": {
            **data.report.model_dump(),
            "used_in_training": int((~held).sum()),
            "held_out": int(held.sum()),
        },
        "threshold_method": method,
        "confidence_level": CONFIDENCE_LEVEL,
        "resamples": options.resamples,
        "seed": options.seed,
    }
    if info.task == "binary":
        only = label_metrics[0]
        metrics |= {"n_studies": only.n, "n_positive": only.n_positive, "threshold": only.threshold}
        metrics |= {name: getattr(only, name).model_dump() for name in METRIC_NAMES}
    else:
        metrics |= {name: macro[name].model_dump() for name in METRIC_NAMES}
        metrics["macro_auroc"] = macro["auroc"].model_dump()
        metrics["per_label"] = {name: value.model_dump() for name, value in per_label.items()}
    metrics["baseline"] = None if comparison is None else comparison.model_dump()

    output = options.output
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    curves = {name: (targets[:, j], probabilities[:, j]) for j, name in enumerate(info.labels)}
    plot_roc(curves, {name: m.auroc.value for name, m in per_label.items()}, output / "roc.png")
    plot_precision_recall(
        curves, {name: m.auprc.value for name, m in per_label.items()}, output / "pr.png"
    )
    predictions = pd.DataFrame(
        {"name": [key for key, keep in zip(data.keys, held, strict=True) if keep]}
    )
    for j, name in enumerate(info.labels):
        predictions[f"target:{name}"] = targets[:, j]
        predictions[f"probability:{name}"] = probabilities[:, j]
    predictions.to_csv(output / "predictions.csv", index=False)
    (output / "report.md").write_text(_report(metrics, per_label, comparison, options))
    logger.info("AUROC {} -> {}", _format(Estimate(**metrics["auroc"])), output)
    if comparison is not None:
        logger.info(
            "linear probe AUROC {}; chosen ({}) minus probe {}",
            _format(comparison.linear_probe.auroc),
            comparison.chosen_head,
            _format(comparison.difference_auroc),
        )
    return metrics

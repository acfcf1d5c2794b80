"""``python -m training train``: embeddings + labels -> a run folder with a trained head.

The run folder holds ``head.pt`` and ``head.json`` (see `convertation.head.configurable`),
``train.log``, ``split.json`` (the names of the training, validation and test rows: evaluate
leaves the first two out) and ``validation.npz`` (the validation rows' targets and the
chosen head's probabilities: evaluate picks the decision thresholds on them). Names that found
no partner are listed in ``unmatched.txt``; the logs carry only counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from convertation.head.configurable import (
    BINARY_LABEL,
    HEAD_INFO_FILE,
    HeadRunInfo,
    SplitSizes,
    Task,
    TrainingProvenance,
    file_sha256,
    save_trained_head,
)
from services.core.labels import FINDING_LABELS
from training.data import (
    MatchedData,
    Split,
    TrainingInputError,
    any_finding,
    load_matched,
    stratified_split,
)
from training.fit import FitData, deterministic_torch
from training.logs import log_file
from training.metrics import auroc, point_metrics, youden_threshold
from training.search import search_head

LOG_FILE = "train.log"
SPLIT_FILE = "split.json"
VALIDATION_FILE = "validation.npz"
UNMATCHED_FILE = "unmatched.txt"
YOUDEN = "youden"
FALLBACK_THRESHOLD = 0.5  # for a label whose validation rows hold one class only


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Task
    embeddings: Path
    labels: Path
    output: Path
    trials: int = Field(ge=1, default=1)
    seed: int = 0
    validation_fraction: float = 0.2
    test_fraction: float = 0.0
    max_epochs: int = Field(gt=0, default=200)
    patience: int = Field(gt=0, default=20)
    batch_size: int = Field(gt=1, default=64)


def choose_thresholds(
    label_names: list[str], targets: np.ndarray, probabilities: np.ndarray
) -> dict[str, float]:
    """Youden's J per label on the validation rows (targets/probabilities ``[n, labels]``)."""
    thresholds = {}
    for j, name in enumerate(label_names):
        column = targets[:, j]
        if column.min() == column.max():
            logger.warning("{!r}: one class in validation, threshold {}", name, FALLBACK_THRESHOLD)
            thresholds[name] = FALLBACK_THRESHOLD
        else:
            thresholds[name] = youden_threshold(column, probabilities[:, j])
    return thresholds


def _targets(task: Task, data: MatchedData) -> tuple[np.ndarray, list[str]]:
    """Training targets (``[n]`` or ``[n, labels]``) and the head's output label names."""
    if task == "binary":
        targets = any_finding(data.labels)
        positives = int(targets.sum())
        if positives in (0, len(targets)):
            raise TrainingInputError(
                f"the binary target has a single class ({positives} of {len(targets)} matched "
                "studies have a finding)"
            )
        return targets, [BINARY_LABEL]
    counts = data.labels.sum(axis=0)
    single = [
        name
        for name, count in zip(data.label_names, counts, strict=True)
        if count in (0, len(data.labels))
    ]
    if single:
        raise TrainingInputError(
            f"label column(s) {single} hold a single class over the {len(data.labels)} matched "
            "studies; drop them from the CSV or add studies"
        )
    undeployable = [name for name in data.label_names if name not in FINDING_LABELS]
    if undeployable:
        logger.warning(
            "labels {} are not among the deployed model's {} findings: such a head can be "
            "evaluated but not deployed",
            undeployable,
            len(FINDING_LABELS),
        )
    return data.labels.copy(), list(data.label_names)


def _split(task: Task, targets: np.ndarray, options: TrainOptions) -> Split:
    strata = targets if task == "binary" else any_finding(targets)
    split = stratified_split(
        strata,
        validation_fraction=options.validation_fraction,
        test_fraction=options.test_fraction,
        seed=options.seed,
    )
    for part in ("train", "validation"):
        rows = getattr(split, part)
        if len(np.unique(strata[rows])) < 2:
            raise TrainingInputError(
                f"the {part} split ({len(rows)} studies) holds a single class; "
                "more studies or another --val-fraction are needed"
            )
    return split


def _positives(task: Task, targets: np.ndarray, split: Split, labels: list[str]) -> dict:
    columns = targets[:, None] if task == "binary" else targets
    return {
        part: {name: int(columns[getattr(split, part), j].sum()) for j, name in enumerate(labels)}
        for part in ("train", "validation", "test")
    }


def _validation_metrics(
    labels: list[str], targets: np.ndarray, probabilities: np.ndarray
) -> dict[str, float | None]:
    per_label = {name: auroc(targets[:, j], probabilities[:, j]) for j, name in enumerate(labels)}
    if len(labels) == 1:
        point = point_metrics(targets[:, 0], probabilities[:, 0], threshold=0.5)
        return {"auroc": per_label[labels[0]], "auprc": point["auprc"]}
    defined = [value for value in per_label.values() if value is not None]
    metrics: dict[str, float | None] = {"macro_auroc": float(np.mean(defined))}
    metrics |= {f"auroc/{name}": value for name, value in per_label.items()}
    return metrics


def _write_side_files(
    output: Path, data: MatchedData, split: Split, targets: np.ndarray, probabilities: np.ndarray
) -> None:
    names = {
        part: [data.keys[i] for i in getattr(split, part)]
        for part in ("train", "validation", "test")
    }
    (output / SPLIT_FILE).write_text(json.dumps(names, indent=1) + "\n")
    np.savez(
        output / VALIDATION_FILE,
        names=np.array(names["validation"]),
        targets=targets,
        probabilities=probabilities,
    )
    unmatched = [f"embedding\t{key}" for key in data.unmatched_embedding_keys]
    unmatched += [f"label\t{key}" for key in data.unmatched_label_keys]
    if unmatched:
        (output / UNMATCHED_FILE).write_text("\n".join(unmatched) + "\n")


def train(options: TrainOptions) -> HeadRunInfo:
    """Train, choose thresholds on validation and write the run folder."""
    output = options.output
    if (output / HEAD_INFO_FILE).exists():
        raise TrainingInputError(f"{output} already holds a trained head; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    with log_file(output / LOG_FILE), deterministic_torch():
        np.random.seed(options.seed)
        torch.manual_seed(options.seed)
        logger.info("training a {} head: {}", options.task, options.model_dump_json())
        data = load_matched(options.embeddings, options.labels)
        logger.info("rows: {}", data.report.model_dump())
        targets, labels = _targets(options.task, data)
        split = _split(options.task, targets, options)
        sizes = SplitSizes(
            train=len(split.train), validation=len(split.validation), test=len(split.test)
        )
        logger.info("split: {} (seed {})", sizes.model_dump(), options.seed)
        fit_data = FitData(
            task=options.task,
            train_vectors=data.vectors[split.train],
            train_targets=targets[split.train],
            validation_vectors=data.vectors[split.validation],
            validation_targets=targets[split.validation],
        )
        schedule = {
            "max_epochs": options.max_epochs,
            "patience": options.patience,
            "batch_size": options.batch_size,
        }
        result = search_head(fit_data, trials=options.trials, seed=options.seed, schedule=schedule)
        validation_targets = fit_data.validation_targets.reshape(len(split.validation), -1)
        probabilities = result.fit.validation_probabilities
        hyperparameters = result.hyperparameters
        info = HeadRunInfo(
            task=options.task,
            architecture=result.fit.head.architecture,
            labels=labels,
            target_findings=list(data.label_names) if options.task == "binary" else [],
            thresholds=choose_thresholds(labels, validation_targets, probabilities),
            threshold_method=YOUDEN,
            training=TrainingProvenance(
                embeddings_file=options.embeddings.name,
                embeddings_sha256=file_sha256(options.embeddings),
                labels_file=options.labels.name,
                labels_sha256=file_sha256(options.labels),
                seed=options.seed,
                validation_fraction=options.validation_fraction,
                test_fraction=options.test_fraction,
                split_sizes=sizes,
                positives=_positives(options.task, targets, split, labels),
                trials=result.trials,
                best_trial=result.best_trial + 1,
                hyperparameters={
                    "learning_rate": hyperparameters.learning_rate,
                    "focal_gamma": hyperparameters.focal_gamma,
                    "weight_decay": hyperparameters.weight_decay,
                    "batch_size": hyperparameters.batch_size,
                    "max_epochs": hyperparameters.max_epochs,
                    "patience": hyperparameters.patience,
                },
                best_epoch=result.fit.best_epoch,
                epochs_run=result.fit.epochs_run,
                torch_version=torch.__version__,
            ),
            validation_metrics=_validation_metrics(labels, validation_targets, probabilities),
        )
        info = save_trained_head(output, result.fit.head, info)
        _write_side_files(output, data, split, validation_targets, probabilities)
        logger.info("validation metrics: {}", info.validation_metrics)
        logger.info("wrote {}", output)
    return info

"""``python -m training train``: embeddings + labels -> a run folder with a trained head.

Every run fits two candidate heads on the same split: the MLP (`training.search`) and the
linear probe (`training.probe`), and keeps one by ``--head`` (`training.selection`). The run
folder holds

* ``head.pt`` and ``head.json`` (see `convertation.head.configurable`): the kept head, what
  ``build_repository --binary-head/--multilabel-head RUN`` deploys; ``head.json``'s
  ``selection`` records both validation scores, the choice and its reason;
* ``linear_probe/``: the linear probe as a run folder of its own (``head.pt``, ``head.json``,
  ``validation.npz``, ``split.json``), whichever head was kept: ``evaluate`` sets the kept
  head beside it, and it can be evaluated or deployed alone;
* ``train.log``, ``split.json`` (the names of the training, validation and test rows:
  evaluate leaves the first two out) and ``validation.npz`` (the validation rows' targets and
  the kept head's probabilities: evaluate picks the decision thresholds on them).

Names that found no partner are listed in ``unmatched.txt``; the logs carry only counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from convertation.head.configurable import (
    BINARY_LABEL,
    HEAD_INFO_FILE,
    ConfigurableHead,
    HeadRunInfo,
    SplitSizes,
    Task,
    TrainingProvenance,
    file_sha256,
    save_trained_head,
)
from convertation.head.selection import LINEAR_PROBE_DIR, HeadRule, HeadSelection
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
from training.probe import ProbeFit, fit_linear_probe
from training.search import SearchResult, search_head
from training.selection import select_head

LOG_FILE = "train.log"
SPLIT_FILE = "split.json"
VALIDATION_FILE = "validation.npz"
UNMATCHED_FILE = "unmatched.txt"
YOUDEN = "youden"
FALLBACK_THRESHOLD = 0.5  # for a label whose validation rows hold one class only
SPLIT_PARTS = ("train", "validation", "test")


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Task
    embeddings: Path
    labels: Path
    output: Path
    head: HeadRule = "best"
    trials: int = Field(ge=1, default=1)
    seed: int = 0
    validation_fraction: float = 0.2
    test_fraction: float = 0.0
    max_epochs: int = Field(gt=0, default=200)
    patience: int = Field(gt=0, default=20)
    batch_size: int = Field(gt=1, default=64)


def choose_thresholds(
    label_names: list[str], targets: NDArray[np.int8], probabilities: NDArray[np.float32]
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


def _targets(task: Task, data: MatchedData) -> tuple[NDArray[np.int8], list[str]]:
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


def _split(task: Task, targets: NDArray[np.int8], options: TrainOptions) -> Split:
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


def _validation_metrics(
    labels: list[str], targets: NDArray[np.int8], probabilities: NDArray[np.float32]
) -> dict[str, float | None]:
    per_label = {name: auroc(targets[:, j], probabilities[:, j]) for j, name in enumerate(labels)}
    if len(labels) == 1:
        point = point_metrics(targets[:, 0], probabilities[:, 0], threshold=0.5)
        return {"auroc": per_label[labels[0]], "auprc": point["auprc"]}
    defined = [value for value in per_label.values() if value is not None]
    metrics: dict[str, float | None] = {"macro_auroc": float(np.mean(defined))}
    metrics |= {f"auroc/{name}": value for name, value in per_label.items()}
    return metrics


@dataclass(frozen=True)
class _TrainedHead:
    """A candidate head with what its ``head.json`` says about how it was trained."""

    head: ConfigurableHead
    validation_probabilities: NDArray[np.float32]
    trials: int  # MLP trials behind it; 0 for the linear probe
    best_trial: int
    hyperparameters: dict[str, float | int]
    best_epoch: int
    epochs_run: int


def _from_search(search: SearchResult) -> _TrainedHead:
    return _TrainedHead(
        head=search.fit.head,
        validation_probabilities=search.fit.validation_probabilities,
        trials=search.trials,
        best_trial=search.best_trial + 1,
        hyperparameters=search.hyperparameters.recorded(),
        best_epoch=search.fit.best_epoch,
        epochs_run=search.fit.epochs_run,
    )


def _from_probe(probe: ProbeFit, labels: list[str]) -> _TrainedHead:
    regularisation = {
        f"C:{label}": label_probe.c
        for label, label_probe in zip(labels, probe.label_probes, strict=True)
        if label_probe.c is not None
    }
    return _TrainedHead(
        head=probe.head,
        validation_probabilities=probe.validation_probabilities,
        trials=0,
        best_trial=0,
        hyperparameters=regularisation,
        best_epoch=0,
        epochs_run=0,
    )


@dataclass(frozen=True)
class _RunData:
    """What every run folder of one ``train`` call shares: the inputs, split and targets."""

    options: TrainOptions
    data: MatchedData
    labels: list[str]
    targets: NDArray[np.int8]
    split: Split
    validation_targets: NDArray[np.int8]  # [n_validation, labels]

    def split_names(self) -> dict[str, list[str]]:
        return {
            part: [self.data.keys[i] for i in getattr(self.split, part)] for part in SPLIT_PARTS
        }

    def positives(self) -> dict[str, dict[str, int]]:
        columns = self.targets[:, None] if self.options.task == "binary" else self.targets
        return {
            part: {
                name: int(columns[getattr(self.split, part), j].sum())
                for j, name in enumerate(self.labels)
            }
            for part in SPLIT_PARTS
        }

    def provenance(self, trained: _TrainedHead) -> TrainingProvenance:
        options = self.options
        return TrainingProvenance(
            embeddings_file=options.embeddings.name,
            embeddings_sha256=file_sha256(options.embeddings),
            labels_file=options.labels.name,
            labels_sha256=file_sha256(options.labels),
            seed=options.seed,
            validation_fraction=options.validation_fraction,
            test_fraction=options.test_fraction,
            split_sizes=SplitSizes(
                **{part: len(getattr(self.split, part)) for part in SPLIT_PARTS}
            ),
            positives=self.positives(),
            trials=trained.trials,
            best_trial=trained.best_trial,
            hyperparameters=trained.hyperparameters,
            best_epoch=trained.best_epoch,
            epochs_run=trained.epochs_run,
            torch_version=torch.__version__,
        )


def _write_run(
    folder: Path, run: _RunData, trained: _TrainedHead, selection: HeadSelection | None
) -> HeadRunInfo:
    """``head.pt``, ``head.json``, ``split.json`` and ``validation.npz`` of one head."""
    probabilities = trained.validation_probabilities
    task = run.options.task
    info = HeadRunInfo(
        task=task,
        architecture=trained.head.architecture,
        labels=run.labels,
        target_findings=list(run.data.label_names) if task == "binary" else [],
        thresholds=choose_thresholds(run.labels, run.validation_targets, probabilities),
        threshold_method=YOUDEN,
        training=run.provenance(trained),
        validation_metrics=_validation_metrics(run.labels, run.validation_targets, probabilities),
        selection=selection,
    )
    info = save_trained_head(folder, trained.head, info)
    names = run.split_names()
    (folder / SPLIT_FILE).write_text(json.dumps(names, indent=1) + "\n")
    np.savez(
        folder / VALIDATION_FILE,
        names=np.array(names["validation"]),
        targets=run.validation_targets,
        probabilities=probabilities,
    )
    return info


def _write_unmatched(output: Path, data: MatchedData) -> None:
    unmatched = [f"embedding\t{key}" for key in data.unmatched_embedding_keys]
    unmatched += [f"label\t{key}" for key in data.unmatched_label_keys]
    if unmatched:
        (output / UNMATCHED_FILE).write_text("\n".join(unmatched) + "\n")


def _prepare(options: TrainOptions) -> tuple[_RunData, FitData]:
    data = load_matched(options.embeddings, options.labels)
    logger.info("rows: {}", data.report.model_dump())
    targets, labels = _targets(options.task, data)
    split = _split(options.task, targets, options)
    logger.info(
        "split: {} (seed {})",
        {part: len(getattr(split, part)) for part in SPLIT_PARTS},
        options.seed,
    )
    fit_data = FitData(
        task=options.task,
        train_vectors=data.vectors[split.train],
        train_targets=targets[split.train],
        validation_vectors=data.vectors[split.validation],
        validation_targets=targets[split.validation],
    )
    run = _RunData(
        options=options,
        data=data,
        labels=labels,
        targets=targets,
        split=split,
        validation_targets=fit_data.validation_columns,
    )
    return run, fit_data


def train(options: TrainOptions) -> HeadRunInfo:
    """Fit the MLP and the linear probe, keep one, choose thresholds, write the run folder."""
    output = options.output
    if (output / HEAD_INFO_FILE).exists():
        raise TrainingInputError(f"{output} already holds a trained head; choose another --output")
    output.mkdir(parents=True, exist_ok=True)
    with log_file(output / LOG_FILE), deterministic_torch():
        np.random.seed(options.seed)
        torch.manual_seed(options.seed)
        logger.info("training a {} head: {}", options.task, options.model_dump_json())
        run, fit_data = _prepare(options)
        probe = fit_linear_probe(fit_data)
        search = None
        if options.head != "linear":
            schedule = {
                "max_epochs": options.max_epochs,
                "patience": options.patience,
                "batch_size": options.batch_size,
            }
            search = search_head(
                fit_data, trials=options.trials, seed=options.seed, schedule=schedule
            )
        selection = select_head(
            options.head,
            search,
            probe,
            run.labels,
            run.validation_targets,
            seed=options.seed,
        )
        probe_head = _from_probe(probe, run.labels)
        _write_run(output / LINEAR_PROBE_DIR, run, probe_head, selection=None)
        kept = probe_head if search is None or selection.chosen != "mlp" else _from_search(search)
        info = _write_run(output, run, kept, selection)
        _write_unmatched(output, run.data)
        logger.info("kept the {}: {}", selection.chosen.replace("_", " "), selection.reason)
        logger.info("validation metrics: {}", info.validation_metrics)
        logger.info("wrote {}", output)
    return info

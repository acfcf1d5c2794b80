"""Fitting one head: focal loss with class-balanced sampling (binary) or BCE with per-label
positive weights (multilabel), AdamW, early stopping on the validation AUROC.

Deterministic for a seed: the weights are initialised right after ``torch.manual_seed``,
batches come from seeded generators, and `deterministic_torch` runs torch on one thread
with deterministic kernels (a CPU matmul may sum in another order on more threads).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import WeightedRandomSampler

from convertation.head.configurable import (
    BINARY_LOGITS,
    SEED_BINARY_ARCHITECTURE,
    SEED_MULTILABEL_ARCHITECTURE,
    Activation,
    ConfigurableHead,
    HeadArchitecture,
    HeadProbabilities,
    Task,
)
from training.metrics import auroc

# A label seen this rarely still gets a bounded weight: pos_weight = negatives / positives.
MAX_POSITIVE_WEIGHT = 100.0
MIN_IMPROVEMENT = 1e-4  # validation AUROC gain that resets the early-stopping patience
EPOCH_LOG_EVERY = 10  # every epoch goes to the log file, every tenth also to the console


class Hyperparameters(BaseModel):
    """What the search varies (architecture and optimisation) plus the fixed schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_sizes: tuple[int, ...]
    activation: Activation
    dropout: float = Field(ge=0.0, lt=1.0)
    batch_norm: bool
    learning_rate: float = Field(gt=0)
    focal_gamma: float = Field(ge=0)
    weight_decay: float = Field(ge=0, default=1e-4)
    batch_size: int = Field(gt=1, default=64)
    max_epochs: int = Field(gt=0, default=200)
    patience: int = Field(gt=0, default=20)

    def architecture(self, task: Task, embedding_dim: int, n_labels: int) -> HeadArchitecture:
        return HeadArchitecture(
            task=task,
            embedding_dim=embedding_dim,
            hidden_sizes=self.hidden_sizes,
            activation=self.activation,
            dropout=self.dropout,
            batch_norm=self.batch_norm,
            n_outputs=BINARY_LOGITS if task == "binary" else n_labels,
        )


DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_FOCAL_GAMMA = 2.0


def seed_hyperparameters(task: Task, **schedule: int) -> Hyperparameters:
    """The seed heads of docs/ARCHITECTURE.md, Contracts with the default optimiser settings."""
    seed = SEED_BINARY_ARCHITECTURE if task == "binary" else SEED_MULTILABEL_ARCHITECTURE
    return Hyperparameters(
        hidden_sizes=seed.hidden_sizes,
        activation=seed.activation,
        dropout=seed.dropout,
        batch_norm=seed.batch_norm,
        learning_rate=DEFAULT_LEARNING_RATE,
        focal_gamma=DEFAULT_FOCAL_GAMMA,
        **schedule,
    )


@dataclass(frozen=True)
class FitData:
    """Training and validation rows. ``targets``: [n] 0/1 (binary) or [n, labels]."""

    task: Task
    train_vectors: np.ndarray
    train_targets: np.ndarray
    validation_vectors: np.ndarray
    validation_targets: np.ndarray


@dataclass(frozen=True)
class FitResult:
    head: ConfigurableHead  # the best epoch's weights, eval mode
    validation_auroc: float
    best_epoch: int
    epochs_run: int
    validation_probabilities: np.ndarray  # [n_validation, 1 or labels]


@contextlib.contextmanager
def deterministic_torch() -> Iterator[None]:
    """One thread and deterministic kernels inside; the previous settings restored after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def focal_loss(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """Mean of -(1 - p_t)^gamma log p_t over two-class logits (gamma 0: cross-entropy)."""
    log_p_true = logits.log_softmax(dim=-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return (-((1 - log_p_true.exp()) ** gamma) * log_p_true).mean()


def positive_weights(targets: np.ndarray) -> Tensor:
    """negatives / positives per label, within [1/MAX, MAX]; 1 for a label without positives."""
    positives = targets.sum(axis=0).astype(np.float64)
    negatives = len(targets) - positives
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    ratio = np.clip(ratio, 1 / MAX_POSITIVE_WEIGHT, MAX_POSITIVE_WEIGHT)
    return torch.tensor(ratio, dtype=torch.float32)


def validation_auroc(task: Task, targets: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary: the AUROC. Multilabel: the mean AUROC over labels with both classes present."""
    if task == "binary":
        value = auroc(targets, probabilities[:, 0])
        return float("nan") if value is None else value
    values = [auroc(targets[:, j], probabilities[:, j]) for j in range(targets.shape[1])]
    defined = [value for value in values if value is not None]
    return float(np.mean(defined)) if defined else float("nan")


def _epoch_order(data: FitData, generator: torch.Generator) -> list[int]:
    rows = len(data.train_vectors)
    if data.task == "multilabel":
        return torch.randperm(rows, generator=generator).tolist()
    targets = data.train_targets.astype(np.int64)
    class_weight = 1.0 / np.bincount(targets, minlength=2).clip(min=1)
    sampler = WeightedRandomSampler(
        class_weight[targets].tolist(),
        num_samples=rows,
        replacement=True,
        generator=generator,
    )
    return list(sampler)


def predict_probabilities(head: ConfigurableHead, vectors: np.ndarray) -> np.ndarray:
    """What the deployed graph computes: [n, 1] P(pathology) or [n, labels]."""
    with torch.no_grad():
        return HeadProbabilities(head.eval())(torch.from_numpy(vectors)).numpy()


def fit_head(
    data: FitData, hyperparameters: Hyperparameters, *, seed: int, log_prefix: str = ""
) -> FitResult:
    """Train from a seeded initialisation; return the weights of the best validation epoch."""
    n_labels = 1 if data.task == "binary" else data.train_targets.shape[1]
    embedding_dim = data.train_vectors.shape[1]
    torch.manual_seed(seed)
    head = ConfigurableHead(hyperparameters.architecture(data.task, embedding_dim, n_labels))
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(
        head.parameters(),
        lr=hyperparameters.learning_rate,
        weight_decay=hyperparameters.weight_decay,
    )
    vectors = torch.from_numpy(data.train_vectors)
    targets = torch.from_numpy(data.train_targets.astype(np.float32))
    bce = nn.BCEWithLogitsLoss(pos_weight=positive_weights(data.train_targets))
    smallest_batch = 2 if hyperparameters.batch_norm else 1  # BatchNorm needs two rows

    best_auroc, best_epoch, best_state = -np.inf, 0, copy.deepcopy(head.state_dict())
    epoch = 0
    for epoch in range(1, hyperparameters.max_epochs + 1):
        head.train()
        order = _epoch_order(data, generator)
        losses = []
        for start in range(0, len(order), hyperparameters.batch_size):
            batch = order[start : start + hyperparameters.batch_size]
            if len(batch) < smallest_batch:
                continue
            logits = head(vectors[batch])
            if data.task == "binary":
                loss = focal_loss(logits, targets[batch], hyperparameters.focal_gamma)
            else:
                loss = bce(logits, targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        probabilities = predict_probabilities(head, data.validation_vectors)
        current = validation_auroc(data.task, data.validation_targets, probabilities)
        improved = current > best_auroc + MIN_IMPROVEMENT
        if improved:
            best_auroc, best_epoch = current, epoch
            best_state = copy.deepcopy(head.state_dict())
        level = "INFO" if epoch % EPOCH_LOG_EVERY == 0 or epoch == 1 else "DEBUG"
        logger.log(
            level,
            "{}epoch {:3d}: loss {:.4f}, validation AUROC {:.4f} (best {:.4f} at epoch {})",
            log_prefix,
            epoch,
            float(np.mean(losses)) if losses else float("nan"),
            current,
            best_auroc,
            best_epoch,
        )
        if epoch - best_epoch >= hyperparameters.patience:
            logger.info(
                "{}early stop at epoch {}: no gain for {} epochs",
                log_prefix,
                epoch,
                hyperparameters.patience,
            )
            break
    head.load_state_dict(best_state)
    head.eval()
    return FitResult(
        head=head,
        validation_auroc=float(best_auroc),
        best_epoch=best_epoch,
        epochs_run=epoch,
        validation_probabilities=predict_probabilities(head, data.validation_vectors),
    )

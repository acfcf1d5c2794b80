"""Fitting one MLP head: focal loss with class-balanced sampling (binary) or BCE with
per-label positive weights (multilabel), AdamW, early stopping on the validation AUROC.

Regularisers for small data, each off at its default: weight decay (AdamW), dropout (in the
architecture), label smoothing (targets pulled towards 1/2 by ``label_smoothing / 2``) and
mixup (a batch mixed with a shuffled copy of itself, inputs and targets alike, with a
Beta(alpha, alpha) weight per row). Both losses take soft targets, so smoothing and mixup
need no other code path.

Deterministic for a seed: the weights are initialised right after ``torch.manual_seed``,
batches and mixup weights come from seeded generators, and `deterministic_torch` runs torch
on one thread with deterministic kernels (a CPU matmul may sum in another order on more
threads).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger
from numpy.typing import NDArray
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


# What a head's architecture (HeadArchitecture) takes of the hyperparameters.
ARCHITECTURE_FIELDS = {"hidden_sizes", "activation", "dropout", "batch_norm"}


class Hyperparameters(BaseModel):
    """What the search varies (architecture, optimisation, regularisation) plus the fixed
    schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_sizes: tuple[int, ...]
    activation: Activation
    dropout: float = Field(ge=0.0, lt=1.0)
    batch_norm: bool
    learning_rate: float = Field(gt=0)
    focal_gamma: float = Field(ge=0)
    weight_decay: float = Field(ge=0, default=1e-4)
    label_smoothing: float = Field(ge=0, lt=1, default=0.0)
    mixup_alpha: float = Field(ge=0, default=0.0)  # 0: no mixup
    batch_size: int = Field(gt=1, default=64)
    max_epochs: int = Field(gt=0, default=200)
    patience: int = Field(gt=0, default=20)

    def architecture(self, task: Task, embedding_dim: int, n_labels: int) -> HeadArchitecture:
        return HeadArchitecture(
            task=task,
            embedding_dim=embedding_dim,
            n_outputs=BINARY_LOGITS if task == "binary" else n_labels,
            **self.model_dump(include=ARCHITECTURE_FIELDS),
        )

    def recorded(self) -> dict[str, float | int]:
        """The optimisation settings for ``head.json`` (the architecture is recorded apart)."""
        return self.model_dump(exclude=ARCHITECTURE_FIELDS)


DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_FOCAL_GAMMA = 2.0


def seed_hyperparameters(task: Task, **schedule: int) -> Hyperparameters:
    """The seed heads of docs/ARCHITECTURE.md, Contracts with the default optimiser settings."""
    seed = SEED_BINARY_ARCHITECTURE if task == "binary" else SEED_MULTILABEL_ARCHITECTURE
    return Hyperparameters(
        **seed.model_dump(include=ARCHITECTURE_FIELDS),
        learning_rate=DEFAULT_LEARNING_RATE,
        focal_gamma=DEFAULT_FOCAL_GAMMA,
        **schedule,
    )


@dataclass(frozen=True)
class FitData:
    """Training and validation rows. ``targets``: [n] 0/1 (binary) or [n, labels]."""

    task: Task
    train_vectors: NDArray[np.float32]
    train_targets: NDArray[np.int8]
    validation_vectors: NDArray[np.float32]
    validation_targets: NDArray[np.int8]

    @property
    def n_labels(self) -> int:
        return 1 if self.task == "binary" else int(self.train_targets.shape[1])

    @property
    def validation_columns(self) -> NDArray[np.int8]:
        """Validation targets as ``[n, labels]`` (binary: one column)."""
        return self.validation_targets.reshape(len(self.validation_targets), -1)


@dataclass(frozen=True)
class FitResult:
    head: ConfigurableHead  # the best epoch's weights, eval mode
    validation_auroc: float
    best_epoch: int
    epochs_run: int
    validation_probabilities: NDArray[np.float32]  # [n_validation, 1 or labels]


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
    """Mean of -sum_c t_c (1 - p_c)^gamma log p_c over two-class logits, ``targets`` the
    (soft) probability of class 1. With 0/1 targets: -(1 - p_t)^gamma log p_t; gamma 0:
    cross-entropy."""
    log_p = logits.log_softmax(dim=-1)
    class_targets = torch.stack([1 - targets, targets], dim=-1)
    return (-(class_targets * (1 - log_p.exp()) ** gamma * log_p).sum(dim=-1)).mean()


def positive_weights(targets: NDArray[np.int8]) -> Tensor:
    """negatives / positives per label, within [1/MAX, MAX]; 1 for a label without positives."""
    positives = targets.sum(axis=0).astype(np.float64)
    negatives = len(targets) - positives
    ratio = np.divide(negatives, positives, out=np.ones_like(positives), where=positives > 0)
    ratio = np.clip(ratio, 1 / MAX_POSITIVE_WEIGHT, MAX_POSITIVE_WEIGHT)
    return torch.tensor(ratio, dtype=torch.float32)


def validation_auroc(
    task: Task, targets: NDArray[np.int8], probabilities: NDArray[np.float32]
) -> float:
    """Binary: the AUROC. Multilabel: the mean AUROC over labels with both classes present."""
    if task == "binary":
        value = auroc(targets.reshape(-1), probabilities[:, 0])
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


def predict_probabilities(
    head: ConfigurableHead, vectors: NDArray[np.float32]
) -> NDArray[np.float32]:
    """What the deployed graph computes: [n, 1] P(pathology) or [n, labels]."""
    with torch.no_grad():
        probabilities: NDArray[np.float32] = HeadProbabilities(head.eval())(
            torch.from_numpy(vectors)
        ).numpy()
    return probabilities


class _Trainer:
    """One head, its optimiser and loss, and the seeded sources of batches and mixup."""

    def __init__(self, data: FitData, hyperparameters: Hyperparameters, seed: int) -> None:
        self.data = data
        self.hyperparameters = hyperparameters
        torch.manual_seed(seed)
        self.head = ConfigurableHead(
            hyperparameters.architecture(data.task, data.train_vectors.shape[1], data.n_labels)
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.mixup_rng = np.random.default_rng(seed)
        self.optimiser = torch.optim.AdamW(
            self.head.parameters(),
            lr=hyperparameters.learning_rate,
            weight_decay=hyperparameters.weight_decay,
        )
        self.vectors = torch.from_numpy(data.train_vectors)
        self.targets = torch.from_numpy(data.train_targets.astype(np.float32))
        self.bce = nn.BCEWithLogitsLoss(pos_weight=positive_weights(data.train_targets))
        # BatchNorm needs two rows in a batch.
        self.smallest_batch = 2 if hyperparameters.batch_norm else 1

    def _mixed(self, vectors: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each row mixed with a shuffled partner, the weight ~ Beta(alpha, alpha) per row."""
        alpha = self.hyperparameters.mixup_alpha
        weight = torch.from_numpy(
            self.mixup_rng.beta(alpha, alpha, size=len(vectors)).astype(np.float32)
        )
        partner = torch.randperm(len(vectors), generator=self.generator)
        mixed_vectors = weight[:, None] * vectors + (1 - weight[:, None]) * vectors[partner]
        mix_targets = weight if targets.dim() == 1 else weight[:, None]
        return mixed_vectors, mix_targets * targets + (1 - mix_targets) * targets[partner]

    def _loss(self, batch: list[int]) -> Tensor:
        vectors, targets = self.vectors[batch], self.targets[batch]
        if self.hyperparameters.mixup_alpha > 0:
            vectors, targets = self._mixed(vectors, targets)
        smoothing = self.hyperparameters.label_smoothing
        targets = targets * (1 - smoothing) + smoothing / 2
        logits = self.head(vectors)
        if self.data.task == "binary":
            return focal_loss(logits, targets, self.hyperparameters.focal_gamma)
        return self.bce(logits, targets)

    def epoch(self) -> float:
        """One pass over the training rows; the mean batch loss (NaN without a batch)."""
        self.head.train()
        order = _epoch_order(self.data, self.generator)
        losses = []
        size = self.hyperparameters.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            if len(batch) < self.smallest_batch:
                continue
            loss = self._loss(batch)
            self.optimiser.zero_grad()
            loss.backward()
            self.optimiser.step()
            losses.append(loss.item())
        return float(np.mean(losses)) if losses else float("nan")


def fit_head(
    data: FitData, hyperparameters: Hyperparameters, *, seed: int, log_prefix: str = ""
) -> FitResult:
    """Train from a seeded initialisation; return the weights of the best validation epoch."""
    trainer = _Trainer(data, hyperparameters, seed)
    head = trainer.head
    best_auroc, best_epoch, best_state = -np.inf, 0, copy.deepcopy(head.state_dict())
    epoch = 0
    for epoch in range(1, hyperparameters.max_epochs + 1):
        loss = trainer.epoch()
        probabilities = predict_probabilities(head, data.validation_vectors)
        current = validation_auroc(data.task, data.validation_targets, probabilities)
        if current > best_auroc + MIN_IMPROVEMENT:
            best_auroc, best_epoch = current, epoch
            best_state = copy.deepcopy(head.state_dict())
        level = "INFO" if epoch % EPOCH_LOG_EVERY == 0 or epoch == 1 else "DEBUG"
        logger.log(
            level,
            "{}epoch {:3d}: loss {:.4f}, validation AUROC {:.4f} (best {:.4f} at epoch {})",
            log_prefix,
            epoch,
            loss,
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

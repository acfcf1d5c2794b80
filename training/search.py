"""Choosing the MLP: the seed design alone, or an optuna TPE search around it.

The search covers what makes an MLP competitive on a few hundred studies: 0-3 hidden layers
of 64-512 (0: a linear head trained with the MLP's loss and regularisers), the activation,
dropout, weight decay, label smoothing, mixup, the learning rate and (binary) the focal
gamma; BatchNorm stays as in the task's seed head; every trial stops early on the validation
AUROC. The first trial is always the seed design, so the search never ends below it on
validation. Trial ``k`` initialises and shuffles with seed ``seed + k`` and the sampler is
seeded, so a search is repeatable.

Whether the MLP is kept at all is decided afterwards, against the linear probe
(`training.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from loguru import logger

from training.fit import FitData, FitResult, Hyperparameters, fit_head, seed_hyperparameters

HIDDEN_SIZE_CHOICES = (64, 128, 256, 512)
MAX_HIDDEN_LAYERS = 3
ACTIVATION_CHOICES = ("gelu", "relu", "leaky_relu", "silu")
DROPOUT_RANGE = (0.0, 0.5)
LEARNING_RATE_RANGE = (1e-4, 3e-3)
FOCAL_GAMMA_RANGE = (0.0, 3.0)
WEIGHT_DECAY_RANGE = (1e-6, 1e-1)  # log scale
LABEL_SMOOTHING_RANGE = (0.0, 0.2)
MIXUP_ALPHA_RANGE = (0.0, 0.4)  # small alphas: most rows stay close to one partner


@dataclass(frozen=True)
class SearchResult:
    hyperparameters: Hyperparameters
    fit: FitResult
    best_trial: int  # 0-based
    trials: int


def _seed_parameters(seed: Hyperparameters, task: str) -> dict[str, object]:
    parameters: dict[str, object] = {
        "hidden_layers": len(seed.hidden_sizes),
        "activation": seed.activation,
        "dropout": seed.dropout,
        "learning_rate": seed.learning_rate,
        "weight_decay": seed.weight_decay,
        "label_smoothing": seed.label_smoothing,
        "mixup_alpha": seed.mixup_alpha,
    }
    parameters |= {f"hidden_size_{i}": size for i, size in enumerate(seed.hidden_sizes)}
    if task == "binary":
        parameters["focal_gamma"] = seed.focal_gamma
    return parameters


def _suggest(trial: optuna.Trial, seed: Hyperparameters, task: str) -> Hyperparameters:
    layers = trial.suggest_int("hidden_layers", 0, MAX_HIDDEN_LAYERS)
    sizes = tuple(
        trial.suggest_categorical(f"hidden_size_{i}", HIDDEN_SIZE_CHOICES) for i in range(layers)
    )
    gamma = (
        trial.suggest_float("focal_gamma", *FOCAL_GAMMA_RANGE)
        if task == "binary"
        else seed.focal_gamma
    )
    return seed.model_copy(
        update={
            "hidden_sizes": sizes,
            "activation": trial.suggest_categorical("activation", ACTIVATION_CHOICES),
            "dropout": trial.suggest_float("dropout", *DROPOUT_RANGE),
            "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True),
            "weight_decay": trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE, log=True),
            "label_smoothing": trial.suggest_float("label_smoothing", *LABEL_SMOOTHING_RANGE),
            "mixup_alpha": trial.suggest_float("mixup_alpha", *MIXUP_ALPHA_RANGE),
            "focal_gamma": gamma,
        }
    )


def _describe(hyperparameters: Hyperparameters, task: str) -> str:
    gamma = f", gamma {hyperparameters.focal_gamma:.2f}" if task == "binary" else ""
    return (
        f"hidden {list(hyperparameters.hidden_sizes)}, {hyperparameters.activation}, "
        f"dropout {hyperparameters.dropout:.2f}, lr {hyperparameters.learning_rate:.2e}, "
        f"weight decay {hyperparameters.weight_decay:.1e}, "
        f"smoothing {hyperparameters.label_smoothing:.2f}, "
        f"mixup {hyperparameters.mixup_alpha:.2f}{gamma}"
    )


def search_head(data: FitData, *, trials: int, seed: int, schedule: dict[str, int]) -> SearchResult:
    """The seed design (``trials <= 1``) or the best of ``trials`` TPE trials on validation."""
    seed_design = seed_hyperparameters(data.task, **schedule)
    if trials <= 1:
        fit = fit_head(data, seed_design, seed=seed)
        logger.info("seed design: validation AUROC {:.4f}", fit.validation_auroc)
        return SearchResult(hyperparameters=seed_design, fit=fit, best_trial=0, trials=1)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial(_seed_parameters(seed_design, data.task))
    fits: dict[int, tuple[Hyperparameters, FitResult]] = {}

    def objective(trial: optuna.Trial) -> float:
        hyperparameters = _suggest(trial, seed_design, data.task)
        prefix = f"trial {trial.number + 1}/{trials} "
        logger.info("{}start: {}", prefix, _describe(hyperparameters, data.task))
        fit = fit_head(data, hyperparameters, seed=seed + trial.number, log_prefix=prefix)
        fits[trial.number] = (hyperparameters, fit)
        logger.info(
            "{}done: validation AUROC {:.4f} at epoch {}",
            prefix,
            fit.validation_auroc,
            fit.best_epoch,
        )
        return fit.validation_auroc

    study.optimize(objective, n_trials=trials)
    best = study.best_trial.number
    hyperparameters, fit = fits[best]
    logger.info("best: trial {} with validation AUROC {:.4f}", best + 1, fit.validation_auroc)
    return SearchResult(hyperparameters=hyperparameters, fit=fit, best_trial=best, trials=trials)

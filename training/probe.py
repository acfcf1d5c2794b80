"""The linear probe: L2-regularised logistic regression on the frozen embeddings, as a head.

Linear probing is the standard baseline for frozen CT-CLIP embeddings, and on a few hundred
studies it is often the best head there is. It is fitted here with scikit-learn's
`LogisticRegression` (L2, lbfgs) on the training rows, after standardising every embedding
dimension with the training rows' mean and standard deviation (so that one C means the same
for every dimension). C, the inverse regularisation strength, is chosen per output label on
the validation rows: the C of `REGULARISATION_GRID` with the lowest validation log-loss, the
smaller C (stronger regularisation) on a tie. Log-loss rather than AUROC: on a validation
split of a few dozen studies AUROC moves in coarse steps and jumps between distant Cs, while
log-loss, a proper scoring rule, varies smoothly with C and also keeps the probe's
probabilities calibrated (they are deployed as probabilities). The path stops once the
validation log-loss has risen `GRID_PATIENCE` times in a row past its minimum: along an L2
path it rises steadily once the fit starts to overfit, and the large-C fits are the slowest
(they need the most lbfgs iterations). A label whose validation rows
hold one class gets `DEFAULT_C`; a label whose training rows hold one class gets no
regression, only a bias at its smoothed training prevalence.

The standardisation is then folded into the coefficients and copied into a
`ConfigurableHead` without hidden layers (one Linear), so that the probe is saved, exported
and deployed by the same code as an MLP head. Binary: logits ``[0, w.x + b]``, whose
softmax at index 1 is exactly the regression's ``sigmoid(w.x + b)``; multilabel: logits
``w_j.x + b_j``, one per label, through sigmoids.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from loguru import logger
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from convertation.head.configurable import ConfigurableHead, Task, linear_architecture
from training.fit import FitData, predict_probabilities, validation_auroc

# 1e-4 .. 1e2 in half decades, on standardised embeddings. On the cohorts of
# training.synthetic (a few hundred 512-d studies) the chosen C lay between 1e-3 and 3e-2;
# the large end is the nearly unregularised fit.
REGULARISATION_GRID: tuple[float, ...] = tuple(
    float(10.0**power) for power in np.arange(-4, 2.5, 0.5)
)
DEFAULT_C = 1.0  # scikit-learn's default, for a label validation cannot choose for
MAX_ITERATIONS = 2000
MIN_IMPROVEMENT = 1e-4  # a larger C must lower the validation log-loss this much to be chosen
GRID_PATIENCE = 2  # Cs past the best one without a lower validation log-loss before stopping


@dataclass(frozen=True)
class LabelProbe:
    """One output label's regression in the embedding's own coordinates: ``w.x + b``."""

    c: float | None  # None: the training rows hold one class, no regression
    weights: NDArray[np.float64]  # [embedding_dim]
    bias: float
    model: LogisticRegression | None  # scikit-learn's fitted estimator (on standardised rows)


@dataclass(frozen=True)
class ProbeFit:
    head: ConfigurableHead  # one Linear, eval mode
    label_probes: list[LabelProbe]
    scaler: StandardScaler
    validation_auroc: float
    validation_probabilities: NDArray[np.float32]  # [n_validation, 1 or labels]

    def sklearn_probabilities(self, vectors: NDArray[np.float32]) -> NDArray[np.float64]:
        """scikit-learn's own ``predict_proba`` per label, ``[n, labels]``: the reference the
        head reproduces."""
        standardised = self.scaler.transform(vectors.astype(np.float64))
        columns = []
        for probe in self.label_probes:
            if probe.model is None:
                columns.append(np.full(len(vectors), 1 / (1 + np.exp(-probe.bias))))
            else:
                columns.append(probe.model.predict_proba(standardised)[:, 1])
        return np.column_stack(columns)


def _choose_c(
    train_x: NDArray[np.float64],
    train_y: NDArray[np.int8],
    validation_x: NDArray[np.float64],
    validation_y: NDArray[np.int8],
) -> tuple[float, LogisticRegression]:
    """The grid's C with the lowest validation log-loss (ascending grid, each fit starting from
    the previous solution), or `DEFAULT_C` when the validation rows hold one class."""
    if validation_y.min() == validation_y.max():
        model = LogisticRegression(C=DEFAULT_C, max_iter=MAX_ITERATIONS)
        return DEFAULT_C, model.fit(train_x, train_y)
    model = LogisticRegression(C=REGULARISATION_GRID[0], max_iter=MAX_ITERATIONS, warm_start=True)
    best_c, best_loss, best_model = DEFAULT_C, np.inf, model
    for index, c in enumerate(REGULARISATION_GRID):
        model.set_params(C=c).fit(train_x, train_y)
        loss = log_loss(validation_y, model.predict_proba(validation_x)[:, 1], labels=[0, 1])
        if loss < best_loss - MIN_IMPROVEMENT:
            best_c, best_loss, best_model = c, loss, copy.deepcopy(model)
        elif index - REGULARISATION_GRID.index(best_c) >= GRID_PATIENCE:
            break
    return best_c, best_model


def _label_probe(
    train_x: NDArray[np.float64],
    train_y: NDArray[np.int8],
    validation_x: NDArray[np.float64],
    validation_y: NDArray[np.int8],
    scaler: StandardScaler,
) -> LabelProbe:
    positives = int(train_y.sum())
    if positives in (0, len(train_y)):
        prevalence = (positives + 0.5) / (len(train_y) + 1)
        bias = float(np.log(prevalence / (1 - prevalence)))
        return LabelProbe(c=None, weights=np.zeros(train_x.shape[1]), bias=bias, model=None)
    c, model = _choose_c(train_x, train_y, validation_x, validation_y)
    # w.((x - mean) / scale) + b  ==  (w / scale).x + (b - w.(mean / scale))
    coefficients = model.coef_[0] / scaler.scale_
    bias = float(model.intercept_[0] - coefficients @ scaler.mean_)
    return LabelProbe(c=c, weights=coefficients, bias=bias, model=model)


def probe_head(task: Task, label_probes: list[LabelProbe], embedding_dim: int) -> ConfigurableHead:
    """The regressions as one Linear of a `ConfigurableHead` (binary: logits [0, w.x + b])."""
    weights = np.stack([probe.weights for probe in label_probes])
    biases = np.array([probe.bias for probe in label_probes])
    if task == "binary":
        weights = np.vstack([np.zeros_like(weights), weights])
        biases = np.r_[0.0, biases]
    head = ConfigurableHead(linear_architecture(task, embedding_dim, len(label_probes)))
    (linear,) = head.net
    assert isinstance(linear, torch.nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weights.astype(np.float32)))
        linear.bias.copy_(torch.from_numpy(biases.astype(np.float32)))
    return head.eval()


def _label_probes(data: FitData) -> tuple[StandardScaler, list[LabelProbe]]:
    """The standardisation and one regression per output label."""
    train_x = data.train_vectors.astype(np.float64)
    scaler = StandardScaler().fit(train_x)
    train_standardised = scaler.transform(train_x)
    validation_standardised = scaler.transform(data.validation_vectors.astype(np.float64))
    train_columns = data.train_targets.reshape(len(data.train_targets), -1)
    validation_columns = data.validation_columns
    # One BLAS thread: lbfgs on a few hundred rows is slower with threads fighting for cores.
    with threadpool_limits(limits=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        label_probes = [
            _label_probe(
                train_standardised,
                train_columns[:, j],
                validation_standardised,
                validation_columns[:, j],
                scaler,
            )
            for j in range(data.n_labels)
        ]
    # Counted into one log line; any other warning goes on as it came.
    not_converged = 0
    for caught_warning in caught:
        if issubclass(caught_warning.category, ConvergenceWarning):
            not_converged += 1
        else:
            warnings.warn_explicit(
                caught_warning.message,
                caught_warning.category,
                caught_warning.filename,
                caught_warning.lineno,
            )
    if not_converged:
        logger.warning(
            "linear probe: lbfgs stopped at {} iterations in {} fits", MAX_ITERATIONS, not_converged
        )
    return scaler, label_probes


def fit_linear_probe(data: FitData) -> ProbeFit:
    """Per label: standardise, choose C on validation, fit on the training rows; as a head."""
    scaler, label_probes = _label_probes(data)
    head = probe_head(data.task, label_probes, data.train_vectors.shape[1])
    probabilities = predict_probabilities(head, data.validation_vectors)
    score = validation_auroc(data.task, data.validation_targets, probabilities)
    logger.info(
        "linear probe: validation AUROC {:.4f}, C {}",
        score,
        sorted({probe.c for probe in label_probes if probe.c is not None}),
    )
    return ProbeFit(
        head=head,
        label_probes=label_probes,
        scaler=scaler,
        validation_auroc=score,
        validation_probabilities=probabilities,
    )

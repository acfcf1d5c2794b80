"""Which head a training run kept, and why: the ``selection`` record of ``head.json``.

``python -m training train`` fits two candidate heads on the same split: the MLP (the seed
design or the best trial of the optuna search) and a linear probe (L2 logistic regression,
its regularisation chosen on the validation rows). ``--head best`` keeps the MLP only when it
is better on the validation rows beyond their noise: the paired bootstrap CI of its AUROC
(binary) or macro AUROC (multilabel) minus the probe's lies above 0; otherwise the probe.
``--head mlp`` and ``--head linear`` force one. The record keeps both validation scores and
their difference, so that a reader of ``head.json`` sees what the kept head was measured
against.

A run written before the linear probe existed (schema version 1) has no record; it loads
with ``selection`` None.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HeadRule = Literal["best", "mlp", "linear"]
HeadKind = Literal["mlp", "linear_probe"]
# Where the run folder keeps the linear probe (a run folder of its own, see training.train).
LINEAR_PROBE_DIR = "linear_probe"


class MlpCandidate(BaseModel):
    """The MLP as the search left it."""

    model_config = ConfigDict(extra="forbid")

    validation_auroc: float
    hidden_sizes: tuple[int, ...]
    trials: int = Field(ge=1)
    best_trial: int = Field(ge=1)
    best_epoch: int = Field(ge=0)


class LinearProbeCandidate(BaseModel):
    """The linear probe: the inverse L2 strength C chosen per output label on validation
    (None: the label's training rows hold one class, the probe gives its prevalence)."""

    model_config = ConfigDict(extra="forbid")

    validation_auroc: float
    regularisation_c: dict[str, float | None]
    folder: str = LINEAR_PROBE_DIR  # relative to the run folder


class AurocDifference(BaseModel):
    """MLP minus linear probe on the validation rows, with its paired bootstrap CI."""

    model_config = ConfigDict(extra="forbid")

    value: float
    ci_low: float | None
    ci_high: float | None
    confidence_level: float
    resamples: int = Field(gt=0)


class HeadSelection(BaseModel):
    """``head.json``'s ``selection``: the rule, the kept head, the reason, both candidates.

    ``validation_auroc`` is the binary AUROC or the multilabel macro AUROC on the run's
    validation rows. ``mlp`` and ``validation_difference`` are None when ``--head linear``
    skipped the MLP.
    """

    model_config = ConfigDict(extra="forbid")

    rule: HeadRule
    chosen: HeadKind
    reason: str
    mlp: MlpCandidate | None
    linear_probe: LinearProbeCandidate
    validation_difference: AurocDifference | None

    @model_validator(mode="after")
    def _consistent(self) -> HeadSelection:
        if self.chosen == "mlp" and self.mlp is None:
            raise ValueError("chosen is mlp but no MLP was trained")
        if self.rule == "mlp" and self.chosen != "mlp":
            raise ValueError("rule mlp must keep the MLP")
        if self.rule == "linear" and self.chosen != "linear_probe":
            raise ValueError("rule linear must keep the linear probe")
        return self

"""A configurable MLP head on the CT-CLIP embedding, its run folder and its ONNX export.

A trained head lives in a *run folder* written by ``python -m training train``:

* ``head.pt``: the state dict of `ConfigurableHead` (keys ``net.N.*``);
* ``head.json``: a `HeadRunInfo`: the `HeadArchitecture`, the label names in output order,
  the decision thresholds, the training provenance, the validation metrics and (schema
  version 2) the `HeadSelection`: which of the MLP and the linear probe was kept and why;
* ``linear_probe/``: the linear probe as a run folder of its own (``head.pt``, ``head.json``,
  ``validation.npz``, ``split.json``), kept whichever head was chosen so that ``training
  evaluate`` can set the chosen head beside it.

A linear probe is a `ConfigurableHead` without hidden layers (`linear_architecture`): one
Linear, so it is saved, loaded, exported and deployed by the same code as an MLP head.

`load_trained_head` rebuilds the module from ``head.json`` and loads ``head.pt`` strictly
(a missing tensor, a wrong shape or weights whose sha256 differs from the one recorded stop
it). `export_trained_head_onnx` writes the same graph interface as
`convertation.head.export` (``embedding`` -> ``pathology_probability`` [batch, 1] or
``finding_probabilities`` [batch, n]) and can lay a multilabel head's outputs onto the
deployed label list (docs/ARCHITECTURE.md, Contracts).

The seed heads of docs/ARCHITECTURE.md, Contracts are `SEED_BINARY_ARCHITECTURE` and
`SEED_MULTILABEL_ARCHITECTURE`: their state-dict keys are those of
`convertation.head.heads.BinaryHead` / `MultilabelHead`, so a seed checkpoint loads here too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from convertation.checkpoints import CheckpointError, load_strict, read_checkpoint
from convertation.head.export import BINARY_OUTPUT_NAME, INPUT_NAME, MULTILABEL_OUTPUT_NAME
from convertation.head.selection import HeadSelection
from convertation.onnx_export import export_module
from services.core.checksums import sha256_of as file_sha256

HEAD_WEIGHTS_FILE = "head.pt"
HEAD_INFO_FILE = "head.json"
# 2 added `HeadRunInfo.selection`; a version 1 folder (without it) still loads.
RUN_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
BINARY_LABEL = "pathology"
# Both classes of the binary head: softmax over two logits, index 1 = P(pathology).
BINARY_LOGITS = 2
LEAKY_RELU_SLOPE = 0.01  # the seed multilabel head's LeakyReLU slope

Task = Literal["binary", "multilabel"]
Activation = Literal["gelu", "relu", "leaky_relu", "silu", "elu", "tanh"]


class HeadRunError(CheckpointError):
    """A run folder cannot be loaded or exported (the message says which file and why)."""


class HeadArchitecture(BaseModel):
    """Everything needed to rebuild the module: an MLP of Linear-[BatchNorm]-activation-Dropout
    blocks and a final Linear giving ``n_outputs`` logits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task
    embedding_dim: int = Field(gt=0)
    hidden_sizes: tuple[int, ...]
    activation: Activation
    dropout: float = Field(ge=0.0, lt=1.0)
    batch_norm: bool
    n_outputs: int = Field(gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> HeadArchitecture:
        if any(size <= 0 for size in self.hidden_sizes):
            raise ValueError(f"hidden sizes must be positive, got {list(self.hidden_sizes)}")
        if self.task == "binary" and self.n_outputs != BINARY_LOGITS:
            raise ValueError(f"a binary head has {BINARY_LOGITS} logits, not {self.n_outputs}")
        return self


SEED_BINARY_ARCHITECTURE = HeadArchitecture(
    task="binary",
    embedding_dim=512,
    hidden_sizes=(256, 128),
    activation="gelu",
    dropout=0.2,
    batch_norm=True,
    n_outputs=BINARY_LOGITS,
)
SEED_MULTILABEL_ARCHITECTURE = HeadArchitecture(
    task="multilabel",
    embedding_dim=512,
    hidden_sizes=(512, 256, 128),
    activation="leaky_relu",
    dropout=0.2,
    batch_norm=False,
    n_outputs=20,
)


def linear_architecture(task: Task, embedding_dim: int, n_labels: int) -> HeadArchitecture:
    """One Linear from the embedding to the logits (the linear probe). Without hidden layers
    there is no activation, BatchNorm or Dropout module: those fields are inert."""
    return HeadArchitecture(
        task=task,
        embedding_dim=embedding_dim,
        hidden_sizes=(),
        activation="relu",
        dropout=0.0,
        batch_norm=False,
        n_outputs=BINARY_LOGITS if task == "binary" else n_labels,
    )


def _activation(name: Activation) -> nn.Module:
    modules: dict[str, nn.Module] = {
        "gelu": nn.GELU(),
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(LEAKY_RELU_SLOPE),
        "silu": nn.SiLU(),
        "elu": nn.ELU(),
        "tanh": nn.Tanh(),
    }
    return modules[name]


class ConfigurableHead(nn.Module):
    """Logits from the embedding; the layer order (and so the keys) follows the seed heads."""

    def __init__(self, architecture: HeadArchitecture) -> None:
        super().__init__()
        self.architecture = architecture
        self.embedding_dim = architecture.embedding_dim
        layers: list[nn.Module] = []
        width_in = architecture.embedding_dim
        for width_out in architecture.hidden_sizes:
            layers.append(nn.Linear(width_in, width_out))
            if architecture.batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            # Dropout stays even at p=0 so that the key numbering never depends on it.
            layers += [_activation(architecture.activation), nn.Dropout(architecture.dropout)]
            width_in = width_out
        layers.append(nn.Linear(width_in, architecture.n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.net(embedding)


class HeadProbabilities(nn.Module):
    """Probabilities as deployed: P(pathology) ``[batch, 1]`` (softmax, index 1) for a binary
    head, independent sigmoids ``[batch, n]`` for a multilabel one."""

    def __init__(self, head: ConfigurableHead) -> None:
        super().__init__()
        self.head = head
        self.task = head.architecture.task

    def forward(self, embedding: Tensor) -> Tensor:
        logits = self.head(embedding)
        if self.task == "binary":
            return logits.softmax(dim=-1)[:, 1:2]
        return torch.sigmoid(logits)


class DeployedLabels(nn.Module):
    """Lays a head's probabilities onto another label order; absent labels get a constant."""

    source_index: Tensor
    fill: Tensor

    def __init__(self, probabilities: nn.Module, source_index: Sequence[int], fill: float) -> None:
        super().__init__()
        self.probabilities = probabilities
        self.register_buffer("source_index", torch.tensor(list(source_index), dtype=torch.long))
        self.register_buffer("fill", torch.tensor([[fill]], dtype=torch.float32))

    def forward(self, embedding: Tensor) -> Tensor:
        values = self.probabilities(embedding)
        padded = torch.cat([values, self.fill.expand(values.shape[0], 1)], dim=1)
        return padded.index_select(1, self.source_index)


class SplitSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: int
    validation: int
    test: int


class TrainingProvenance(BaseModel):
    """Where the head came from: data hashes, split, search and the chosen hyper-parameters."""

    model_config = ConfigDict(extra="forbid")

    embeddings_file: str
    embeddings_sha256: str
    labels_file: str
    labels_sha256: str
    seed: int
    validation_fraction: float
    test_fraction: float
    split_sizes: SplitSizes
    positives: dict[str, dict[str, int]]
    trials: int
    best_trial: int
    hyperparameters: dict[str, float | int]
    best_epoch: int
    epochs_run: int
    torch_version: str


class HeadRunInfo(BaseModel):
    """The content of ``head.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = RUN_SCHEMA_VERSION
    task: Task
    architecture: HeadArchitecture
    # Output order. Binary: ["pathology"]; multilabel: the finding names.
    labels: list[str]
    # Binary: the finding columns whose "any" made the target.
    target_findings: list[str]
    thresholds: dict[str, float]
    threshold_method: str
    weights_sha256: str = ""  # filled by save_trained_head
    training: TrainingProvenance
    validation_metrics: dict[str, float | None]
    # Which candidate the run kept (None: a version 1 run, or the probe's own folder).
    selection: HeadSelection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> HeadRunInfo:
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"schema_version {self.schema_version} is not one of {READABLE_SCHEMA_VERSIONS}"
            )
        if self.schema_version == 1 and self.selection is not None:
            raise ValueError("schema_version 1 has no selection")
        if self.architecture.task != self.task:
            raise ValueError(f"task {self.task} but architecture for {self.architecture.task}")
        expected = 1 if self.task == "binary" else self.architecture.n_outputs
        if len(self.labels) != expected:
            raise ValueError(f"{len(self.labels)} labels for a head with {expected} outputs")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("duplicate label names")
        if set(self.thresholds) - set(self.labels):
            raise ValueError(
                f"thresholds for unknown labels {set(self.thresholds) - set(self.labels)}"
            )
        return self


def read_run_info(run_dir: Path) -> HeadRunInfo:
    """``run_dir/head.json`` validated (unknown keys are errors)."""
    path = Path(run_dir) / HEAD_INFO_FILE
    if not path.is_file():
        raise HeadRunError(f"{path} not found: is {run_dir} a run folder of `training train`?")
    try:
        return HeadRunInfo.model_validate_json(path.read_text())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise HeadRunError(f"{path} is not a valid head.json: {where}: {first['msg']}") from error


def write_run_info(run_dir: Path, info: HeadRunInfo) -> Path:
    path = Path(run_dir) / HEAD_INFO_FILE
    path.write_text(json.dumps(info.model_dump(mode="json"), indent=2) + "\n")
    return path


def save_trained_head(run_dir: Path, head: ConfigurableHead, info: HeadRunInfo) -> HeadRunInfo:
    """Write ``head.pt`` and ``head.json`` (with the weights' sha256) into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = run_dir / HEAD_WEIGHTS_FILE
    torch.save({key: value.detach().cpu() for key, value in head.state_dict().items()}, weights)
    info = info.model_copy(update={"weights_sha256": file_sha256(weights)})
    write_run_info(run_dir, info)
    return info


def load_trained_head(run_dir: Path) -> tuple[ConfigurableHead, HeadRunInfo]:
    """The head of a run folder in eval mode, loaded strictly, and its ``head.json``."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    weights = run_dir / HEAD_WEIGHTS_FILE
    if not weights.is_file():
        raise HeadRunError(f"{weights} not found")
    actual = file_sha256(weights)
    if actual != info.weights_sha256:
        raise HeadRunError(
            f"{weights} has sha256 {actual[:12]}…, head.json records {info.weights_sha256[:12]}…"
        )
    head = ConfigurableHead(info.architecture)
    load_strict(head, read_checkpoint(weights), required_prefix="")
    return head.eval(), info


def deployed_label_index(
    head_labels: Sequence[str], deployed_labels: Sequence[str], *, allow_missing: bool
) -> list[int]:
    """For each deployed label, its index among ``head_labels`` (``len(head_labels)`` when
    absent, i.e. the fill column of `DeployedLabels`).

    A head label that is not deployed is always an error (its output would be lost
    silently); a deployed label the head lacks is one unless ``allow_missing``.
    """
    unknown = [label for label in head_labels if label not in deployed_labels]
    if unknown:
        raise HeadRunError(f"the head has labels the deployed model does not know: {unknown}")
    missing = [label for label in deployed_labels if label not in head_labels]
    if missing and not allow_missing:
        raise HeadRunError(
            f"the head lacks {len(missing)} deployed labels: {missing} "
            "(give a fill probability to deploy it anyway)"
        )
    position = {label: index for index, label in enumerate(head_labels)}
    return [position.get(label, len(head_labels)) for label in deployed_labels]


def export_trained_head_onnx(
    head: ConfigurableHead,
    info: HeadRunInfo,
    output: Path,
    *,
    deployed_labels: Sequence[str] | None = None,
    missing_label_probability: float | None = None,
) -> Path:
    """ONNX with `convertation.head.export`'s names: ``embedding`` [batch, E] ->
    ``pathology_probability`` [batch, 1] (binary) or ``finding_probabilities`` (multilabel).

    With ``deployed_labels`` a multilabel head's outputs come in that order; labels the head
    lacks get ``missing_label_probability`` (without it, a missing label is an error).
    """
    probabilities: nn.Module = HeadProbabilities(head.eval())
    if info.task == "binary":
        output_name = BINARY_OUTPUT_NAME
    else:
        output_name = MULTILABEL_OUTPUT_NAME
        if deployed_labels is not None:
            allow_missing = missing_label_probability is not None
            index = deployed_label_index(info.labels, deployed_labels, allow_missing=allow_missing)
            fill = missing_label_probability if missing_label_probability is not None else 0.0
            probabilities = DeployedLabels(probabilities, index, fill)
    example = nn.functional.normalize(
        torch.randn(2, head.embedding_dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    return export_module(
        probabilities.eval(), example, output, input_name=INPUT_NAME, output_name=output_name
    )

"""Heads for the model repository: a seed checkpoint file or a trained run folder.

``--binary-head`` / ``--multilabel-head`` name either a checkpoint of the seed heads
(`convertation.head.heads`, a file) or a run folder of ``python -m training train`` (a folder
with ``head.json``). A run folder is loaded strictly with the architecture its ``head.json``
records (`load_trained_head`) and brings its evaluated thresholds into ``metadata.json``.

A multilabel head trained on fewer findings than the deployed labels
(`services.core.labels.FINDING_LABELS`; CT-RATE has 18 of the 20) is laid onto the deployed
order inside the exported graph. A deployed finding the head lacks is refused unless the
builder is told ``--missing-findings fill``: the graph then outputs a constant 0 for it and
``metadata.json`` lists it under ``not_assessed`` (no threshold, never positive, never the most
dangerous finding, no probability in the reports). Filling with a number that looks like a
probability would be a silent lie; refusing by default keeps the choice explicit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from convertation.errors import BuildError
from convertation.head.configurable import (
    BINARY_LABEL,
    HEAD_INFO_FILE,
    HEAD_WEIGHTS_FILE,
    ConfigurableHead,
    HeadRunInfo,
    Task,
    export_trained_head_onnx,
    load_trained_head,
)
from convertation.head.export import export_binary_head_onnx, export_multilabel_head_onnx
from convertation.head.heads import (
    BinaryHead,
    MultilabelHead,
    load_binary_head,
    load_multilabel_head,
)
from convertation.model_sources import MissingFindings

# The constant a not-assessed finding gets in the graph (never read as a probability).
NOT_ASSESSED_OUTPUT = 0.0
# A seed head carries no evaluated threshold: the metadata's default applies.
SEED_HEAD_THRESHOLD = 0.5


@dataclass(frozen=True)
class TrainedHead:
    """A head of a ``training train`` run folder, with its ``head.json``."""

    module: ConfigurableHead
    info: HeadRunInfo
    run_dir: Path
    not_assessed: tuple[str, ...] = ()  # deployed findings the head lacks (multilabel, fill)

    @property
    def weights(self) -> Path:
        return self.run_dir / HEAD_WEIGHTS_FILE


Head = BinaryHead | MultilabelHead | TrainedHead


def is_run_folder(path: Path) -> bool:
    return Path(path).is_dir()


def load_head(
    path: Path,
    task: Task,
    embedding_dim: int,
    *,
    deployed_labels: Sequence[str],
    missing_findings: MissingFindings,
) -> Head:
    """A seed checkpoint (a file) or a trained run (a folder with head.json), checked for
    ``task``, the encoder's embedding size and, for multilabel, the deployed labels."""
    path = Path(path)
    if not path.exists():
        raise BuildError(f"{task} head not found: {path}")
    if not is_run_folder(path):
        if task == "binary":
            return load_binary_head(path, embedding_dim)
        return load_multilabel_head(path, embedding_dim)
    if not (path / HEAD_INFO_FILE).is_file():
        raise BuildError(f"{path} is a folder without {HEAD_INFO_FILE}: not a training run")
    module, info = load_trained_head(path)
    if info.task != task:
        raise BuildError(f"{path} holds a {info.task} head, given as the {task} head")
    if info.architecture.embedding_dim != embedding_dim:
        raise BuildError(
            f"{path}: the head takes {info.architecture.embedding_dim}-d embeddings, the "
            f"encoder gives {embedding_dim}-d ones"
        )
    if task == "binary":
        return TrainedHead(module=module, info=info, run_dir=path)
    unknown = [label for label in info.labels if label not in deployed_labels]
    if unknown:
        raise BuildError(f"{path}: findings the deployed model does not know: {unknown}")
    missing = tuple(label for label in deployed_labels if label not in info.labels)
    if missing and missing_findings is MissingFindings.REFUSE:
        raise BuildError(
            f"{path}: the head was trained without {len(missing)} deployed findings "
            f"({', '.join(missing)}); train on all of them, or build with "
            "--missing-findings fill to deploy them as not assessed"
        )
    return TrainedHead(module=module, info=info, run_dir=path, not_assessed=missing)


def export_head(head: Head, output: Path, *, deployed_labels: Sequence[str]) -> Path:
    """The head's ONNX graph with the interface of `convertation.head.export`."""
    if isinstance(head, TrainedHead):
        fill = NOT_ASSESSED_OUTPUT if head.not_assessed else None
        return export_trained_head_onnx(
            head.module,
            head.info,
            output,
            deployed_labels=deployed_labels if head.info.task == "multilabel" else None,
            missing_label_probability=fill,
        )
    if isinstance(head, BinaryHead):
        return export_binary_head_onnx(head, output)
    return export_multilabel_head_onnx(head, output)


def head_module(head: Head) -> nn.Module:
    return head.module if isinstance(head, TrainedHead) else head


@dataclass(frozen=True)
class DeployedThresholds:
    pathology: float
    findings: dict[str, float]  # every assessed deployed finding
    not_assessed: list[str]


def deployed_thresholds(
    binary: Head, multilabel: Head, *, deployed_labels: Sequence[str]
) -> DeployedThresholds:
    """Thresholds chosen by ``training evaluate`` (or ``train``) from the run folders; the
    default for a seed head."""
    pathology = SEED_HEAD_THRESHOLD
    if isinstance(binary, TrainedHead):
        pathology = binary.info.thresholds.get(BINARY_LABEL, SEED_HEAD_THRESHOLD)
    trained = multilabel.info.thresholds if isinstance(multilabel, TrainedHead) else {}
    not_assessed = multilabel.not_assessed if isinstance(multilabel, TrainedHead) else ()
    return DeployedThresholds(
        pathology=pathology,
        findings={
            label: trained.get(label, SEED_HEAD_THRESHOLD)
            for label in deployed_labels
            if label not in not_assessed
        },
        not_assessed=[label for label in deployed_labels if label in not_assessed],
    )

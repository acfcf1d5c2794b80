"""Where the repository's models come from: seeded demo weights or checkpoint files.

Both give a `ModelSet`: the torch modules to export and, per model, its `Provenance` (the
seed, or the checkpoint's path and sha256), which the repository's metadata records. A head
is a seed checkpoint or a trained run folder of ``python -m training train``
(`convertation.head.deploy`); trained heads may go with demo encoder weights too. The
body-part regression model is optional (`BodyPartSource`: seeded demo weights with a demo
lookup table, or bpreg's model folder). torch is imported only when models are made, so
that importing this module (``--help``) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convertation.errors import BuildError
from convertation.vit.ctvit_config import encoder_config_or_full, encoder_config_record
from services.core.body_part.bpr_settings import BprInferenceSettings
from services.core.checksums import sha256_of
from services.core.model_metadata import BINARY_HEAD_NAME, ENCODER_NAME, MULTILABEL_HEAD_NAME

if TYPE_CHECKING:
    from convertation.bpr.network import BodyPartRegressionNet
    from convertation.head.deploy import Head
    from convertation.vit.ctvit import CTClipImageEncoder

HASH_CHUNK_BYTES = 16 * 1024 * 1024


class MissingFindings(str, Enum):
    """What to do with deployed findings a trained multilabel head lacks (head/deploy.py)."""

    REFUSE = "refuse"
    FILL = "fill"


@dataclass(frozen=True)
class Provenance:
    """Where a model's numbers came from: a seed, or a checkpoint file and its sha256."""

    source: str
    source_sha256: str | None = None


@dataclass(frozen=True)
class BodyPartSource:
    """The body-part regression network to export, its lookup table and provenance."""

    network: BodyPartRegressionNet
    settings: BprInferenceSettings
    demo: bool
    provenance: Provenance


@dataclass
class ModelSet:
    """The torch modules to export, with their provenance."""

    encoder: CTClipImageEncoder
    binary_head: Head  # a seed head or a trained run's (convertation/head/deploy.py)
    multilabel_head: Head
    ctvit_config: dict[str, Any]
    embedding_dim: int
    demo: bool
    provenance: dict[str, Provenance]
    # None: the repository has no body-part regression model (the chest check uses lung_air).
    body_part_regression: BodyPartSource | None = None


def demo_models(seed: int, ctvit_config_path: Path | None) -> ModelSet:
    """Seeded weights (meaningless probabilities) for the configured encoder and both heads."""
    from convertation.head.heads import build_demo_heads
    from convertation.vit.ctvit import build_demo_encoder

    config, dim_latent = encoder_config_or_full(ctvit_config_path)
    encoder = build_demo_encoder(config, dim_latent, seed)
    binary_head, multilabel_head = build_demo_heads(dim_latent, seed)
    provenance = Provenance(source=f"demo: seeded (seed={seed})")
    return ModelSet(
        encoder=encoder,
        binary_head=binary_head,
        multilabel_head=multilabel_head,
        ctvit_config=encoder_config_record(config, dim_latent),
        embedding_dim=dim_latent,
        demo=True,
        provenance=dict.fromkeys(
            (ENCODER_NAME, BINARY_HEAD_NAME, MULTILABEL_HEAD_NAME), provenance
        ),
    )


def checkpoint_models(
    encoder_checkpoint: Path,
    binary_head_checkpoint: Path,
    multilabel_head_checkpoint: Path,
    ctvit_config_path: Path | None,
    missing_findings: MissingFindings | None = None,
) -> ModelSet:
    """The three models loaded strictly from their checkpoints (`convertation.checkpoints`);
    a head may be a trained run folder instead of a checkpoint file."""
    from convertation.vit.export import load_encoder

    encoder_path = Path(encoder_checkpoint).resolve()
    if not encoder_path.is_file():
        raise BuildError(f"checkpoint for {ENCODER_NAME} not found: {encoder_path}")
    config, dim_latent = encoder_config_or_full(ctvit_config_path)
    binary, multilabel, provenance = load_heads(
        binary_head_checkpoint, multilabel_head_checkpoint, dim_latent, missing_findings
    )
    provenance[ENCODER_NAME] = Provenance(
        source=str(encoder_path), source_sha256=sha256_of(encoder_path)
    )
    return ModelSet(
        encoder=load_encoder(config, dim_latent, encoder_path),
        binary_head=binary,
        multilabel_head=multilabel,
        ctvit_config=encoder_config_record(config, dim_latent),
        embedding_dim=dim_latent,
        demo=False,
        provenance=provenance,
    )


def with_encoder_checkpoint(
    models: ModelSet, encoder_checkpoint: Path, ctvit_config_path: Path | None
) -> ModelSet:
    """``models`` with the encoder loaded strictly from a checkpoint (the heads kept)."""
    from convertation.vit.export import load_encoder

    path = Path(encoder_checkpoint).resolve()
    if not path.is_file():
        raise BuildError(f"checkpoint for {ENCODER_NAME} not found: {path}")
    config, dim_latent = encoder_config_or_full(ctvit_config_path)
    models.encoder = load_encoder(config, dim_latent, path)
    models.provenance[ENCODER_NAME] = Provenance(source=str(path), source_sha256=sha256_of(path))
    return models


def load_heads(
    binary_head: Path,
    multilabel_head: Path,
    embedding_dim: int,
    missing_findings: MissingFindings | None = None,
) -> tuple[Head, Head, dict[str, Provenance]]:
    """Both heads from checkpoint files or trained run folders, with their provenance."""
    from convertation.head.configurable import Task
    from convertation.head.deploy import TrainedHead, load_head
    from services.core.labels import FINDING_LABELS

    policy = missing_findings or MissingFindings.REFUSE
    wanted: tuple[tuple[str, Task, Path], ...] = (
        (BINARY_HEAD_NAME, "binary", Path(binary_head).resolve()),
        (MULTILABEL_HEAD_NAME, "multilabel", Path(multilabel_head).resolve()),
    )
    heads: dict[str, Head] = {}
    provenance: dict[str, Provenance] = {}
    for name, task, path in wanted:
        if not path.exists():
            raise BuildError(f"checkpoint for {name} not found: {path}")
        head = load_head(
            path, task, embedding_dim, deployed_labels=FINDING_LABELS, missing_findings=policy
        )
        heads[name] = head
        if isinstance(head, TrainedHead):
            provenance[name] = Provenance(
                source=f"trained run {path}", source_sha256=head.info.weights_sha256
            )
        else:
            provenance[name] = Provenance(source=str(path), source_sha256=sha256_of(path))
    return heads[BINARY_HEAD_NAME], heads[MULTILABEL_HEAD_NAME], provenance


def demo_body_part(seed: int) -> BodyPartSource:
    """Seeded DEMO body-part regression weights with the invented lookup table (``demo``)."""
    import torch

    from convertation.bpr.network import BodyPartRegressionNet, demo_state_dict
    from convertation.checkpoints import load_strict
    from services.core.body_part.bpr_settings import demo_inference_settings

    network = BodyPartRegressionNet()
    state = {key: torch.from_numpy(value) for key, value in demo_state_dict(seed).items()}
    load_strict(network, state)
    return BodyPartSource(
        network=network.eval(),
        settings=demo_inference_settings(),
        demo=True,
        provenance=Provenance(source=f"demo: seeded (seed={seed}), invented lookup table"),
    )


def body_part_from_folder(folder: Path) -> BodyPartSource:
    """bpreg's model folder (``model.pt``, ``config.json``, ``inference-settings.json``)."""
    from convertation.bpr.loading import load_bpr_model

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise BuildError(
            f"--bpr-model must be bpreg's model folder (model.pt, config.json, "
            f"inference-settings.json); {folder} is not a folder: a bare weights file has no "
            "lookup table to read the scores with"
        )
    loaded = load_bpr_model(folder)
    assert loaded.settings is not None  # a folder always brings its settings
    return BodyPartSource(
        network=loaded.network,
        settings=loaded.settings,
        demo=loaded.demo,
        provenance=Provenance(source=str(loaded.weights_path), source_sha256=loaded.weights_sha256),
    )

"""Where the repository's models come from: seeded demo weights or checkpoint files.

Both give a `ModelSet`: the torch modules to export and, per model, its `Provenance` (the
seed, or the checkpoint's path and sha256), which the repository's metadata records. The
body-part regression model is optional (`BodyPartSource`: seeded demo weights with a demo
lookup table, or bpreg's model folder). torch is imported only when models are made, so
that importing this module (``--help``) stays fast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convertation.errors import BuildError
from convertation.vit.ctvit_config import encoder_config_or_full, encoder_config_record
from services.core.body_part.bpr_settings import BprInferenceSettings
from services.core.model_metadata import BINARY_HEAD_NAME, ENCODER_NAME, MULTILABEL_HEAD_NAME

if TYPE_CHECKING:
    from convertation.bpr.network import BodyPartRegressionNet
    from convertation.head.heads import BinaryHead, MultilabelHead
    from convertation.vit.ctvit import CTClipImageEncoder

HASH_CHUNK_BYTES = 16 * 1024 * 1024


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
    binary_head: BinaryHead
    multilabel_head: MultilabelHead
    ctvit_config: dict[str, Any]
    embedding_dim: int
    demo: bool
    provenance: dict[str, Provenance]
    # None: the repository has no body-part regression model (the chest check uses lung_air).
    body_part_regression: BodyPartSource | None = None


def sha256_of(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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
) -> ModelSet:
    """The three models loaded strictly from their checkpoints (`convertation.checkpoints`)."""
    from convertation.head.heads import load_binary_head, load_multilabel_head
    from convertation.vit.export import load_encoder

    paths = {
        ENCODER_NAME: Path(encoder_checkpoint).resolve(),
        BINARY_HEAD_NAME: Path(binary_head_checkpoint).resolve(),
        MULTILABEL_HEAD_NAME: Path(multilabel_head_checkpoint).resolve(),
    }
    for name, path in paths.items():
        if not path.is_file():
            raise BuildError(f"checkpoint for {name} not found: {path}")
    config, dim_latent = encoder_config_or_full(ctvit_config_path)
    return ModelSet(
        encoder=load_encoder(config, dim_latent, paths[ENCODER_NAME]),
        binary_head=load_binary_head(paths[BINARY_HEAD_NAME], dim_latent),
        multilabel_head=load_multilabel_head(paths[MULTILABEL_HEAD_NAME], dim_latent),
        ctvit_config=encoder_config_record(config, dim_latent),
        embedding_dim=dim_latent,
        demo=False,
        provenance={
            name: Provenance(source=str(path), source_sha256=sha256_of(path))
            for name, path in paths.items()
        },
    )


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

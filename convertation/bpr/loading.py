"""Loading a body-part regression model strictly: bpreg's model folder, a bare file, an npz.

Accepted sources:

* bpreg's public model folder: ``model.pt`` (the state dict), ``config.json`` (its training
  settings; only ``base_model`` matters here and must be ``vgg``) and
  ``inference-settings.json`` (the lookup table, validated as `BprInferenceSettings`);
* a bare ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` state dict (possibly nested or prefixed, see
  `convertation.checkpoints`) or an ``.npz`` of arrays under the same keys.

Every tensor of `BodyPartRegressionNet` must be there with its shape; otherwise the error
names the key (or the file, or the settings field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from pydantic import ValidationError

from convertation.bpr.network import BodyPartRegressionNet, demo_state_dict
from convertation.checkpoints import load_strict, read_checkpoint
from convertation.errors import CheckpointError
from services.core.arrays import Float32Array
from services.core.body_part.bpr_settings import (
    BprInferenceSettings,
    InterpretationRules,
    demo_inference_settings,
    inference_settings_json,
    missing_landmarks,
)
from services.core.checksums import sha256_of as file_sha256

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
SETTINGS_FILE = "inference-settings.json"
SUPPORTED_BASE_MODEL = "vgg"


@dataclass(frozen=True)
class LoadedBprModel:
    """A loaded network with where it came from."""

    network: BodyPartRegressionNet
    weights_path: Path
    weights_sha256: str
    settings: BprInferenceSettings | None  # from a model folder; None for a bare file
    demo: bool  # the settings are a demo table (demo weights)


def _validation_text(error: ValidationError) -> str:
    """Pydantic's errors on one line, each as ``field.path: message``."""
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "document"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def read_inference_settings(path: Path) -> BprInferenceSettings:
    """Parse and validate an ``inference-settings.json`` (errors name the field)."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {Path(path).name}: {error}") from error
    try:
        settings = BprInferenceSettings.model_validate(document)
    except ValidationError as error:
        raise CheckpointError(f"{Path(path).name}: {_validation_text(error)}") from error
    missing = missing_landmarks(settings, InterpretationRules())
    if missing:
        raise CheckpointError(
            f"{Path(path).name}: the lookup table lacks landmarks the interpretation needs: "
            + ", ".join(missing)
        )
    return settings


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path.name}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path.name} holds a {type(config).__name__}, not an object")
    base_model = config.get("base_model", SUPPORTED_BASE_MODEL)
    if base_model != SUPPORTED_BASE_MODEL:
        raise CheckpointError(
            f"{path.name}: base_model {base_model!r} is not supported "
            f"(only bpreg's {SUPPORTED_BASE_MODEL!r} network)"
        )


def read_model_folder(folder: Path) -> tuple[Path, BprInferenceSettings]:
    """The weights file and the validated settings of a bpreg model folder."""
    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE, SETTINGS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder} is not a bpreg model folder: {name} is missing "
                f"(expected {MODEL_FILE}, {CONFIG_FILE}, {SETTINGS_FILE})"
            )
    _check_config(folder / CONFIG_FILE)
    return folder / MODEL_FILE, read_inference_settings(folder / SETTINGS_FILE)


def load_network(weights: Path) -> BodyPartRegressionNet:
    """The network with every tensor from ``weights`` (a missing key or shape is an error)."""
    network = BodyPartRegressionNet()
    load_strict(network, read_checkpoint(weights))
    return network.eval()


def load_bpr_model(source: Path) -> LoadedBprModel:
    """Load a model folder or a bare weights file (see the module docstring)."""
    source = Path(source)
    settings: BprInferenceSettings | None = None
    if source.is_dir():
        weights, settings = read_model_folder(source)
    else:
        weights = source
    network = load_network(weights)
    logger.info(
        "body-part regression weights {} loaded{}",
        weights.name,
        " with a DEMO lookup table" if settings is not None and settings.demo else "",
    )
    return LoadedBprModel(
        network=network,
        weights_path=weights,
        weights_sha256=file_sha256(weights),
        settings=settings,
        demo=bool(settings is not None and settings.demo),
    )


def write_model_folder(
    folder: Path, state_dict: dict[str, Float32Array], settings: BprInferenceSettings
) -> Path:
    """Write a folder laid out like bpreg's: ``model.pt``, ``config.json``, settings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state_dict.items()
    }
    torch.save(tensors, folder / MODEL_FILE)
    config = {"base_model": SUPPORTED_BASE_MODEL, "demo": settings.demo}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (folder / SETTINGS_FILE).write_text(
        json.dumps(inference_settings_json(settings), indent=2) + "\n"
    )
    return folder


def write_demo_model_folder(folder: Path, seed: int = 0) -> Path:
    """A DEMO model folder: seeded weights and an invented lookup table (``demo: true``)."""
    return write_model_folder(folder, demo_state_dict(seed), demo_inference_settings())

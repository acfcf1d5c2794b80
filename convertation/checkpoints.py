"""Reading checkpoints and loading them strictly into a module.

A checkpoint may come as a bare state dict, nested under ``"state_dict"`` / ``"model"``, or
with every key under an outer prefix (``module.`` from DataParallel, ``model.`` from
Lightning, ...). `load_strict` finds that prefix, loads every tensor the module holds and
fails loudly, naming the key, when one is missing or has the wrong shape. Keys the module does
not need (CT-CLIP's text tower, the CTViT decoder, VQ statistics, ...) are skipped and counted
in one log line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from pydantic import BaseModel
from torch import nn

from convertation.errors import CheckpointError

NESTING_KEYS = ("state_dict", "model")
TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin"}
# Tensors in a module's state dict that inference does not read: a checkpoint may lack them.
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class LoadSummary(BaseModel):
    loaded: int
    skipped: int
    prefix: str


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.pt``/``.pth``/``.ckpt``/``.bin`` (torch) or ``.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.array(archive[key])) for key in archive.files}
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"unsupported checkpoint type {path.suffix!r} ({path.name}); "
            f"expected .npz or one of {sorted(TORCH_SUFFIXES)}"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a corrupt or unsafe file
        raise CheckpointError(f"cannot read checkpoint {path.name}: {error}") from error
    return _unwrap_state_dict(content, path.name)


def _unwrap_state_dict(content: object, name: str) -> dict[str, torch.Tensor]:
    while isinstance(content, Mapping):
        nested = [key for key in NESTING_KEYS if isinstance(content.get(key), Mapping)]
        if not nested:
            break
        content = content[nested[0]]
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{name} holds a {type(content).__name__}, not a state dict")
    tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name} holds no tensors (keys: {list(content)[:5]})")
    return tensors


def find_prefix(expected_keys: list[str], available_keys: list[str]) -> str:
    """The outer prefix under which most of ``expected_keys`` appear in ``available_keys``.

    Ties go to the shortest prefix. Raises when no expected key appears under any prefix.
    """
    expected = set(expected_keys)
    matches: Counter[str] = Counter()
    for key in available_keys:
        if key in expected:
            matches[""] += 1
        for position, char in enumerate(key):
            if char == "." and key[position + 1 :] in expected:
                matches[key[: position + 1]] += 1
    if not matches:
        raise CheckpointError(
            f"no key of the checkpoint ends with a key the model needs, "
            f"e.g. {expected_keys[0]!r} (first checkpoint key: "
            f"{available_keys[0] if available_keys else None!r})"
        )
    return max(matches, key=lambda prefix: (matches[prefix], -len(prefix)))


def _skipped_groups(keys: list[str]) -> str:
    """Skipped keys counted by module path (layer numbers as ``*``), biggest groups first."""
    groups = Counter(
        ".".join("*" if part.isdigit() else part for part in key.split(".")[:-1]) or key
        for key in keys
    )
    shown = ", ".join(f"{group}: {count}" for group, count in groups.most_common(5))
    rest = len(groups) - 5
    return shown + (f", and {rest} more groups" if rest > 0 else "")


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    required_prefix: str | None = None,
) -> LoadSummary:
    """Load every tensor ``module`` holds from ``state_dict``; skip (and count) the rest.

    ``required_prefix`` fixes the outer prefix instead of detecting it (``""`` for none).
    Raises `CheckpointError` naming the key on a missing tensor or a shape mismatch.
    """
    own = module.state_dict()
    own_keys = list(own)
    available = list(state_dict)
    prefix = required_prefix if required_prefix is not None else find_prefix(own_keys, available)
    complete: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, current in own.items():
        source_key = prefix + key
        if source_key not in state_dict:
            if key.endswith(OPTIONAL_SUFFIXES):
                complete[key] = current
                continue
            raise CheckpointError(
                f"missing key {source_key!r} in the checkpoint "
                f"(outer prefix {prefix!r}; {len(available)} keys present)"
            )
        tensor = state_dict[source_key]
        if tuple(tensor.shape) != tuple(current.shape):
            raise CheckpointError(
                f"shape mismatch for key {source_key!r}: checkpoint has {tuple(tensor.shape)}, "
                f"the model needs {tuple(current.shape)}"
            )
        complete[key] = tensor.to(current.dtype)
        used.add(source_key)
    module.load_state_dict(complete, strict=True)

    skipped = [key for key in available if key not in used]
    logger.info(
        "loaded {} tensors into {} (outer prefix {!r}); skipped {} unneeded keys{}",
        len(used),
        type(module).__name__,
        prefix,
        len(skipped),
        f" ({_skipped_groups(skipped)})" if skipped else "",
    )
    return LoadSummary(loaded=len(used), skipped=len(skipped), prefix=prefix)

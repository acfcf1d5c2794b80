"""CT-CLIP's CTViT hyper-parameters: the pydantic model, the full CT-CLIP values and the file.

This module needs no torch: the repository builder reads and records the configuration
before it imports the encoder (`convertation.vit.ctvit`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from convertation.errors import EncoderConfigError, one_line

# CT-CLIP's feed-forward: hidden width int(4 * 2/3 * dim), doubled for the GEGLU gate.
FF_MULT = 4


class CTViTConfig(BaseModel):
    """CT-CLIP's CTViT constructor hyper-parameters (the encoder-relevant ones).

    ``input_depth`` is not a CTViT argument: it is the number of slices the encoder is built
    and exported for (CTViT itself accepts any multiple of ``temporal_patch_size``). When it
    is None the token grid is a cube, which for CT-CLIP gives the contract's 240 slices.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: PositiveInt
    codebook_size: PositiveInt
    image_size: PositiveInt
    patch_size: PositiveInt
    temporal_patch_size: PositiveInt
    spatial_depth: PositiveInt
    temporal_depth: PositiveInt
    dim_head: PositiveInt
    heads: PositiveInt
    input_depth: PositiveInt | None = None

    @model_validator(mode="after")
    def _sizes_divide(self) -> CTViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.input_depth is not None and self.input_depth % self.temporal_patch_size:
            raise ValueError(
                f"input_depth {self.input_depth} is not a multiple of "
                f"temporal_patch_size {self.temporal_patch_size}"
            )
        return self

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_volume(self) -> int:
        """Voxels in one patch (one input channel): the width of the patch embedding input."""
        return self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def ff_inner_dim(self) -> int:
        return int(FF_MULT * (2 / 3) * self.dim)

    @property
    def depth_slices(self) -> int:
        if self.input_depth is not None:
            return self.input_depth
        return self.patches_per_side * self.temporal_patch_size

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the volumes the encoder is built and exported for."""
        return (self.depth_slices, self.image_size, self.image_size)


FULL_CTVIT_CONFIG = CTViTConfig(
    dim=512,
    codebook_size=8192,
    image_size=480,
    patch_size=20,
    temporal_patch_size=10,
    spatial_depth=4,
    temporal_depth=4,
    dim_head=32,
    heads=8,
)
FULL_DIM_LATENT = 512


def read_encoder_config(path: Path) -> tuple[CTViTConfig, int]:
    """Read ``{"ctvit": {...}, "dim_latent": N, "input_shape": [B, 1, D, H, W]?, ...}``.

    An ``input_shape`` entry fixes the depth the encoder is exported for; its H and W must
    equal ``image_size``. Raises `EncoderConfigError` naming the file and the problem.
    """
    try:
        return _parse_encoder_config(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as error:  # JSON and pydantic validation errors included
        raise EncoderConfigError(
            f"cannot read the CTViT config {path}: {one_line(error)}"
        ) from error


def _parse_encoder_config(document: Any) -> tuple[CTViTConfig, int]:
    try:
        ctvit_fields = dict(document["ctvit"])
        dim_latent = int(document["dim_latent"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"expected keys 'ctvit' and 'dim_latent' ({error})") from error
    input_shape = document.get("input_shape")
    if input_shape is not None and "input_depth" not in ctvit_fields:
        *_, depth, height, width = (int(n) for n in input_shape)
        if height != width or height != int(ctvit_fields.get("image_size", -1)):
            raise ValueError(f"input_shape {input_shape} does not match image_size")
        ctvit_fields["input_depth"] = depth
    return CTViTConfig(**ctvit_fields), dim_latent


def encoder_config_or_full(path: Path | None) -> tuple[CTViTConfig, int]:
    """The configuration in ``path``, or CT-CLIP's full one when no file is given."""
    if path is None:
        return FULL_CTVIT_CONFIG, FULL_DIM_LATENT
    return read_encoder_config(path)


def encoder_config_record(config: CTViTConfig, dim_latent: int) -> dict[str, Any]:
    """The document `read_encoder_config` reads, so that the same encoder can be rebuilt."""
    return {"ctvit": config.model_dump(), "dim_latent": dim_latent}

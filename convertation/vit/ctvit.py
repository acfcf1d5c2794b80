"""The CT-CLIP image encoder (CTViT encoder path + latent projection), written for inference.

CT-CLIP encodes a chest CT with the encoder half of a CTViT (a 3D ViT-VQGAN):

    volume [B, 1, D, H, W]
      -> patch embedding        Rearrange -> LayerNorm -> Linear -> LayerNorm   [B, t, h, w, dim]
      -> spatial transformer    attention over the h*w tokens of each time step, with a
                                continuous relative position bias; causal depthwise-conv PEG
      -> temporal transformer   attention over the t tokens of each (h, w) position
      -> vector quantiser       nearest codebook vector by cosine similarity
      -> mean over t, flatten (h, w, dim) -> to_visual_latent (no bias) -> L2 normalise

Only what the forward pass needs is built: no decoder, no first-frame patch embedding, no
cross attention. Parameter names reproduce CT-CLIP's state-dict keys (``visual_transformer.*``
and ``to_visual_latent.weight``) so that a CT-CLIP checkpoint loads with
`convertation.checkpoints.load_strict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convertation.vit.ctvit_config import (
    FULL_CTVIT_CONFIG,
    FULL_DIM_LATENT,
    CTViTConfig,
    read_encoder_config,
)
from convertation.vit.transformer_blocks import (
    ContinuousPositionBias,
    CosineSimQuantiser,
    FactorisedTransformer,
    PatchRearrange,
)

# The configuration lives in ctvit_config (no torch there); callers that build encoders
# import it from here with the encoder.
__all__ = [
    "FULL_CTVIT_CONFIG",
    "FULL_DIM_LATENT",
    "CTClipImageEncoder",
    "CTViTConfig",
    "CTViTEncoder",
    "build_demo_encoder",
    "read_encoder_config",
]


class CTViTEncoder(nn.Module):
    """CTViT's encoder path up to and including the vector quantiser."""

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_rel_pos_bias = ContinuousPositionBias(config.dim, config.heads)
        self.to_patch_emb = nn.Sequential(
            PatchRearrange(config.temporal_patch_size, config.patch_size),
            nn.LayerNorm(config.patch_volume),
            nn.Linear(config.patch_volume, config.dim),
            nn.LayerNorm(config.dim),
        )
        self.enc_spatial_transformer = FactorisedTransformer(config, config.spatial_depth)
        self.enc_temporal_transformer = FactorisedTransformer(config, config.temporal_depth)
        self.vq = CosineSimQuantiser(config.codebook_size, config.dim)

    def spatial_bias(self) -> Tensor:
        """The spatial attention bias ``[1, heads, h*w, h*w]`` (weights only)."""
        side = self.config.patches_per_side
        return self.spatial_rel_pos_bias(side, side)[None]

    def transformed(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        """``[B, 1, D, H, W] -> [B, h, w, t, dim]`` tokens before the vector quantiser, in the
        (b h w) t order the temporal transformer leaves them in.

        ``spatial_bias`` may be passed in precomputed (it depends on the weights only): the
        ONNX export stores it as a constant instead of running its MLP for every volume.
        """
        if volume.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise ValueError(
                f"expected slices of {self.config.image_size}x{self.config.image_size}, "
                f"got {tuple(volume.shape[-2:])}"
            )
        tokens = self.to_patch_emb(volume)
        _, t, h, w, dim = tokens.shape
        grid = (t, h, w)
        if spatial_bias is None:
            spatial_bias = self.spatial_rel_pos_bias(h, w)[None]

        tokens = tokens.reshape(-1, h * w, dim)  # (b t) (h w) d
        tokens = self.enc_spatial_transformer(tokens, grid, spatial_bias)

        tokens = tokens.reshape(-1, t, h * w, dim).transpose(1, 2).reshape(-1, t, dim)
        tokens = self.enc_temporal_transformer(tokens, grid)  # (b h w) t d
        return tokens.reshape(-1, h, w, t, dim)

    def forward(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        """``[B, 1, D, H, W] -> [B, t, h, w, dim]`` quantised tokens (CTViT's layout)."""
        return self.vq(self.transformed(volume, spatial_bias).permute(0, 3, 1, 2, 4))


class CTClipImageEncoder(nn.Module):
    """CT-CLIP's image tower: CTViT encoder, mean over depth, flatten, latent projection."""

    def __init__(self, config: CTViTConfig, dim_latent: int) -> None:
        super().__init__()
        self.config = config
        self.dim_latent = dim_latent
        self.visual_transformer = CTViTEncoder(config)
        flat_dim = config.patches_per_side**2 * config.dim
        self.to_visual_latent = nn.Linear(flat_dim, dim_latent, bias=False)

    def expected_input_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the volumes this encoder is built and exported for."""
        return self.config.volume_shape

    def encode_tokens(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        return self.visual_transformer(volume, spatial_bias)

    def unnormalised_embedding(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        # Quantised per token, then averaged over depth (CTViT's time axis) where the
        # temporal transformer left it (axis 3): the same numbers as CTViT's [B, t, h, w]
        # layout without a transpose of every token first.
        tokens = self.visual_transformer.vq(
            self.visual_transformer.transformed(volume, spatial_bias)
        )
        pooled = tokens.mean(dim=3)
        return self.to_visual_latent(pooled.reshape(pooled.shape[0], -1))

    def forward(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        return F.normalize(self.unnormalised_embedding(volume, spatial_bias), dim=-1)


def build_demo_encoder(config: CTViTConfig, dim_latent: int, seed: int) -> CTClipImageEncoder:
    """The whole architecture with seeded weights (they mean nothing), in eval mode.

    Layers keep torch's default initialisation; the norms' gains and the attention scales are
    jittered so that a mix-up of those tensors changes the output; the codebook gets unit
    vectors, as cosine-similarity training leaves it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CTClipImageEncoder(config, dim_latent)
        with torch.no_grad():
            for name, tensor in encoder.named_parameters():
                if name.endswith(("gamma", "q_scale", "k_scale")) or (
                    name.endswith("weight") and tensor.ndim == 1
                ):
                    tensor.mul_(1 + 0.1 * torch.randn_like(tensor))
            codebook = encoder.visual_transformer.vq._codebook.embed
            codebook.copy_(F.normalize(torch.randn_like(codebook), dim=-1))
    return encoder.eval()

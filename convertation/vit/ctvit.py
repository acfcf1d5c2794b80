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

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator
from torch import Tensor, nn

# CT-CLIP's attention multiplies the cosine similarities of q and k by a fixed 8.
ATTENTION_SCALE = 8.0
# CT-CLIP's feed-forward: hidden width int(4 * 2/3 * dim), doubled for the GEGLU gate.
FF_MULT = 4
# Slope of the LeakyReLU in the continuous position bias MLP.
POSITION_BIAS_LEAKY_SLOPE = 0.1


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
    equal ``image_size``.
    """
    document = json.loads(Path(path).read_text())
    try:
        ctvit_fields = dict(document["ctvit"])
        dim_latent = int(document["dim_latent"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: expected keys 'ctvit' and 'dim_latent' ({error})") from error
    input_shape = document.get("input_shape")
    if input_shape is not None and "input_depth" not in ctvit_fields:
        *_, depth, height, width = (int(n) for n in input_shape)
        if height != width or height != int(ctvit_fields.get("image_size", -1)):
            raise ValueError(f"{path}: input_shape {input_shape} does not match image_size")
        ctvit_fields["input_depth"] = depth
    return CTViTConfig(**ctvit_fields), dim_latent


# --------------------------------------------------------------------------- building blocks


class GammaBetaLayerNorm(nn.Module):
    """LayerNorm whose weight is ``gamma`` and whose (fixed, zero in CT-CLIP) bias is ``beta``.

    CT-CLIP keeps beta as a buffer; it is still loaded because it is in the checkpoint.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class PatchRearrange(nn.Module):
    """``b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)``: cut the volume into patches."""

    def __init__(self, temporal_patch_size: int, patch_size: int) -> None:
        super().__init__()
        self.pt = temporal_patch_size
        self.p = patch_size

    def forward(self, volume: Tensor) -> Tensor:
        _, channels, depth, height, width = volume.shape
        t, h, w = depth // self.pt, height // self.p, width // self.p
        patches = volume.reshape(-1, channels, t, self.pt, h, self.p, w, self.p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7)
        return patches.reshape(-1, t, h, w, channels * self.pt * self.p * self.p)


class CausalDepthwisePositions(nn.Module):
    """PEG: a depthwise 3x3x3 convolution over the (t, h, w) token grid, causal along t.

    ``grid`` is (t, h, w). The tokens are reinterpreted as ``[-1, t, h, w, dim]`` by a plain
    reshape, whatever their current order: in the temporal transformer the rows are ordered
    (b h w) t, so CT-CLIP's PEG mixes a scrambled grid there. The trained weights expect
    exactly that, so it is reproduced, not fixed.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        original_shape = x.shape
        t, h, w = grid
        volume = x.reshape(-1, t, h, w, x.shape[-1]).permute(0, 4, 1, 2, 3)
        # Pad w and h by one on both sides, t by two in front only (causal in time).
        volume = F.pad(volume, (1, 1, 1, 1, 2, 0))
        volume = self.dsconv(volume)
        return volume.permute(0, 2, 3, 4, 1).reshape(original_shape)


class CosineSimAttention(nn.Module):
    """Multi-head self-attention on l2-normalised q and k with learned per-channel scales."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner_dim = dim_head * heads
        self.norm = GammaBetaLayerNorm(dim)
        # CT-CLIP allocates null key/values; the encoder uses zero of them. Kept (empty) so a
        # checkpoint built with a different count fails the shape check instead of loading.
        self.register_buffer("null_kv", torch.zeros(heads, 0, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        # CT-CLIP normalises only the query input: keys and values come from the raw tokens.
        # Keys and values are two products with the halves of to_kv's weight (the same
        # numbers as chunking one product): the exported graph then has no Split copying
        # the (tokens x 2 * inner) result apart.
        key_weight, value_weight = self.to_kv.weight.chunk(2, dim=0)
        keys, values = F.linear(x, key_weight), F.linear(x, value_weight)
        queries = self.to_q(self.norm(x))
        q = l2_normalise(self._split_heads(queries)) * (self.q_scale * ATTENTION_SCALE)
        k = l2_normalise(self._split_heads(keys)) * self.k_scale
        similarity = q @ k.transpose(-1, -2)
        if bias is not None:
            similarity = similarity + bias
        attended = similarity.softmax(dim=-1) @ self._split_heads(values)
        attended = attended.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(attended)


def l2_normalise(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, dim=-1)`` without its explicit broadcast (an Expand in the graph)."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)


def gelu(x: Tensor) -> Tensor:
    """Exact (erf) GELU, written in the order onnxruntime's GeluFusion recognises.

    ``F.gelu`` exports as ``x * (0.5 * (1 + erf(x / sqrt 2)))``, which onnxruntime leaves as
    five elementwise passes over the feed-forward's largest tensor; this order becomes one
    fused Gelu kernel. Same function, rounding differences only (~1e-7).
    """
    return (x * 0.5) * (torch.erf(x / math.sqrt(2.0)) + 1.0)


class GEGLU(nn.Module):
    """Gated GELU: the second half of the features, through GELU, gates the first half."""

    def forward(self, x: Tensor) -> Tensor:
        value, gate = x.chunk(2, dim=-1)
        return gelu(gate) * value


class GegluFeedForward(nn.Sequential):
    """CT-CLIP's feed-forward: LayerNorm -> Linear(dim, 2 * inner) -> GEGLU -> Linear(inner, dim).

    The index layout (0 norm, 1 in, 2 GEGLU, 3 dropout, 4 out) matches CT-CLIP's keys. The
    forward pass multiplies by the value and gate halves of the input weight separately
    (the same numbers as splitting one product), so the exported graph does not copy the
    (tokens x 2 * inner) product apart with a Split.
    """

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim * 2, bias=False),
            GEGLU(),
            nn.Dropout(0.0),
            nn.Linear(inner_dim, dim, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        norm, project_in, _, dropout, project_out = self
        hidden = norm(x)
        value_weight, gate_weight = project_in.weight.chunk(2, dim=0)
        gated = gelu(F.linear(hidden, gate_weight)) * F.linear(hidden, value_weight)
        return project_out(dropout(gated))


def geglu_feed_forward(dim: int, inner_dim: int) -> GegluFeedForward:
    return GegluFeedForward(dim, inner_dim)


class FactorisedTransformer(nn.Module):
    """CT-CLIP's Transformer with PEG, self-attention and feed-forward (no cross attention).

    Each layer is ``[PEG, attention, <cross-attention slot, empty>, feed-forward]`` so that the
    keys read ``layers.N.0`` / ``.1`` / ``.3``.
    """

    def __init__(self, config: CTViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    CausalDepthwisePositions(config.dim),
                    CosineSimAttention(config.dim, config.dim_head, config.heads),
                    nn.Identity(),
                    geglu_feed_forward(config.dim, config.ff_inner_dim),
                ]
            )
            for _ in range(depth)
        )
        self.norm_out = GammaBetaLayerNorm(config.dim)

    def forward(
        self, x: Tensor, grid: tuple[int, int, int], attn_bias: Tensor | None = None
    ) -> Tensor:
        for peg, attention, _, feed_forward in self.layers:
            x = peg(x, grid) + x
            x = attention(x, attn_bias) + x
            x = feed_forward(x) + x
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Attention bias per head from an MLP of the log-scaled 2D offset between two tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(POSITION_BIAS_LEAKY_SLOPE)),
                nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(POSITION_BIAS_LEAKY_SLOPE)),
                nn.Linear(dim, heads),
            ]
        )

    def forward(self, height: int, width: int) -> Tensor:
        """The bias ``[heads, h*w, h*w]`` for a grid of ``height`` x ``width`` tokens."""
        device = self.net[2].weight.device
        rows, cols = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        positions = torch.stack((rows.reshape(-1), cols.reshape(-1)), dim=-1)
        offsets = positions[:, None, :] - positions[None, :, :]
        offsets = torch.sign(offsets) * torch.log(offsets.abs() + 1)
        for layer in self.net:
            offsets = layer(offsets)
        return offsets.permute(2, 0, 1)


class Codebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(1, codebook_size, dim))


class CosineSimQuantiser(nn.Module):
    """Replaces every token by the codebook vector with the highest cosine similarity.

    The output is the stored codebook row itself (CT-CLIP's vector_quantize_pytorch returns
    the raw row, not a re-normalised one).
    """

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(codebook_size, dim)

    def codes(self, tokens: Tensor) -> Tensor:
        """Index of the nearest codebook vector for every token ``[..., dim] -> [...]``."""
        codebook = F.normalize(self._codebook.embed[0], dim=-1)
        return (l2_normalise(tokens) @ codebook.t()).argmax(dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.embedding(self.codes(tokens), self._codebook.embed[0])


# --------------------------------------------------------------------------- the encoder


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
        side = self.config.patches_per_side
        return self.spatial_rel_pos_bias(side, side)

    def forward(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        """``[B, 1, D, H, W] -> [B, t, h, w, dim]`` quantised tokens.

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
            spatial_bias = self.spatial_rel_pos_bias(h, w)

        tokens = tokens.reshape(-1, h * w, dim)  # (b t) (h w) d
        tokens = self.enc_spatial_transformer(tokens, grid, spatial_bias)

        tokens = tokens.reshape(-1, t, h * w, dim).transpose(1, 2).reshape(-1, t, dim)
        tokens = self.enc_temporal_transformer(tokens, grid)  # (b h w) t d

        tokens = tokens.reshape(-1, h, w, t, dim).permute(0, 3, 1, 2, 4)
        return self.vq(tokens)


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
        size = self.config.image_size
        return (self.config.depth_slices, size, size)

    def encode_tokens(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        return self.visual_transformer(volume, spatial_bias)

    def unnormalised_embedding(self, volume: Tensor, spatial_bias: Tensor | None = None) -> Tensor:
        tokens = self.encode_tokens(volume, spatial_bias)
        pooled = tokens.mean(dim=1)  # over depth (CTViT's time axis)
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

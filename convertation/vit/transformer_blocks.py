"""The layers of CT-CLIP's CTViT encoder, with CT-CLIP's parameter names.

Patch cutting, the gamma/beta LayerNorm, the causal depthwise-convolution position
encoding (PEG), cosine-similarity attention, the GEGLU feed-forward, the transformer that
stacks them, the continuous position bias and the cosine-similarity vector quantiser.
`convertation.vit.ctvit` assembles them into the encoder.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convertation.vit.ctvit_config import CTViTConfig
from convertation.vit.fused_attention import multi_head_attention

# CT-CLIP's attention multiplies the cosine similarities of q and k by a fixed 8.
ATTENTION_SCALE = 8.0
# Slope of the LeakyReLU in the continuous position bias MLP.
POSITION_BIAS_LEAKY_SLOPE = 0.1


class GammaBetaLayerNorm(nn.Module):
    """LayerNorm whose weight is ``gamma`` and whose (fixed, zero in CT-CLIP) bias is ``beta``.

    CT-CLIP keeps beta as a buffer; it is still loaded because it is in the checkpoint.
    """

    beta: Tensor

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

    null_kv: Tensor

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

    def _per_head(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.dim_head))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        # CT-CLIP normalises only the query input: keys and values come from the raw tokens.
        # Keys and values are two products with the halves of to_kv's weight (the same
        # numbers as chunking one product): the exported graph then has no Split copying
        # the (tokens x 2 * inner) result apart.
        key_weight, value_weight = self.to_kv.weight.chunk(2, dim=0)
        keys, values = F.linear(x, key_weight), F.linear(x, value_weight)
        queries = self.to_q(self.norm(x))
        # q and k are normalised per head in the [B, S, heads, dim_head] layout the products
        # leave them in (the same numbers as after splitting the heads off), so that the
        # attention takes them without a transpose.
        q = l2_normalise(self._per_head(queries)) * (self.q_scale * ATTENTION_SCALE)
        k = l2_normalise(self._per_head(keys)) * self.k_scale
        attended = multi_head_attention(q.flatten(-2), k.flatten(-2), values, bias, self.heads)
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
        # Indexing a Sequential gives a plain Module; the slot holds the Linear built above.
        value_weight, gate_weight = cast(nn.Linear, project_in).weight.chunk(2, dim=0)
        gated = gelu(F.linear(hidden, gate_weight)) * F.linear(hidden, value_weight)
        return project_out(dropout(gated))


class FactorisedLayer(nn.ModuleList):
    """One transformer layer: ``[PEG, attention, <cross-attention slot, empty>, feed-forward]``.

    A list, so that the keys read ``.0`` / ``.1`` / ``.3`` as in CT-CLIP; each part is added
    to the tokens it reads (residual connections).
    """

    def __init__(self, config: CTViTConfig) -> None:
        super().__init__(
            [
                CausalDepthwisePositions(config.dim),
                CosineSimAttention(config.dim, config.dim_head, config.heads),
                nn.Identity(),
                GegluFeedForward(config.dim, config.ff_inner_dim),
            ]
        )

    def forward(self, x: Tensor, grid: tuple[int, int, int], attn_bias: Tensor | None) -> Tensor:
        peg, attention, _, feed_forward = self
        x = peg(x, grid) + x
        x = attention(x, attn_bias) + x
        return feed_forward(x) + x


class FactorisedTransformer(nn.Module):
    """CT-CLIP's Transformer with PEG, self-attention and feed-forward (no cross attention).

    The layers' keys read ``layers.N.0`` / ``.1`` / ``.3`` (see `FactorisedLayer`).
    """

    def __init__(self, config: CTViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(FactorisedLayer(config) for _ in range(depth))
        self.norm_out = GammaBetaLayerNorm(config.dim)

    def forward(
        self, x: Tensor, grid: tuple[int, int, int], attn_bias: Tensor | None = None
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, grid, attn_bias)
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
        device = next(self.parameters()).device
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
    """Holds the codebook ``[1, codebook_size, dim]`` under CT-CLIP's key ``..._codebook.embed``."""

    embed: Tensor

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

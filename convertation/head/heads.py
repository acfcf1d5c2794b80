"""The two MLP heads on the CT-CLIP embedding and their probability wrappers.

State-dict keys (what a head checkpoint must hold; see `load_binary_head`):

* `BinaryHead` (E -> 256 -> 128 -> 2), ``net.`` + ...
  ``0`` Linear(E, 256) ``weight``/``bias``; ``1`` BatchNorm1d(256) ``weight``/``bias``/
  ``running_mean``/``running_var`` (``num_batches_tracked`` optional); ``4`` Linear(256, 128);
  ``5`` BatchNorm1d(128); ``8`` Linear(128, 2).
* `MultilabelHead` (E -> 512 -> 256 -> 128 -> 20), ``net.`` + ``0``, ``3``, ``6``, ``9``:
  Linear ``weight``/``bias``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor, nn

from convertation.checkpoints import load_strict, read_checkpoint
from services.core.labels import FINDING_LABELS

EMBEDDING_DIM = 512
N_FINDINGS = len(FINDING_LABELS)  # one output per finding, in the label list's order
DROPOUT = 0.2
LEAKY_SLOPE = 0.01


class BinaryHead(nn.Module):
    """Pathology yes/no from the embedding: Linear-BatchNorm-GELU-Dropout blocks, 2 logits."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, 256),
            nn.BatchNorm1d(256),
            nn.GELU(),
            nn.Dropout(DROPOUT),
            nn.Linear(256, 128),
            nn.BatchNorm1d(128),
            nn.GELU(),
            nn.Dropout(DROPOUT),
            nn.Linear(128, 2),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        """Logits ``[batch, 2]``: index 0 no pathology, index 1 pathology."""
        return self.net(embedding)


class MultilabelHead(nn.Module):
    """One logit per finding (FINDING_LABELS order): Linear-LeakyReLU-Dropout blocks."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        widths = [embedding_dim, 512, 256, 128]
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers += [
                nn.Linear(width_in, width_out),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.Dropout(DROPOUT),
            ]
        layers.append(nn.Linear(widths[-1], N_FINDINGS))
        self.net = nn.Sequential(*layers)

    def forward(self, embedding: Tensor) -> Tensor:
        """Logits ``[batch, 20]``."""
        return self.net(embedding)


class PathologyProbability(nn.Module):
    """P(pathology) ``[batch, 1]``: softmax over the binary head's logits, index 1."""

    def __init__(self, head: BinaryHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, embedding: Tensor) -> Tensor:
        return self.head(embedding).softmax(dim=-1)[:, 1:2]


class FindingProbabilities(nn.Module):
    """Independent probability of every finding ``[batch, 20]`` (sigmoid of the logits)."""

    def __init__(self, head: MultilabelHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, embedding: Tensor) -> Tensor:
        return torch.sigmoid(self.head(embedding))


def build_demo_heads(embedding_dim: int, seed: int) -> tuple[BinaryHead, MultilabelHead]:
    """Both heads with seeded weights (meaningless), in eval mode.

    The BatchNorm statistics get random values too, so that the exported graph really
    applies them (default statistics would make BatchNorm an identity).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        binary, multilabel = BinaryHead(embedding_dim), MultilabelHead(embedding_dim)
        with torch.no_grad():
            for module in binary.modules():
                if isinstance(module, nn.BatchNorm1d):
                    # Present: BatchNorm1d tracks running statistics unless told not to.
                    assert module.running_mean is not None
                    assert module.running_var is not None
                    module.running_mean.normal_(0, 0.05)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.8, 1.2)
                    module.bias.normal_(0, 0.05)
    return binary.eval(), multilabel.eval()


def load_binary_head(path: Path, embedding_dim: int = EMBEDDING_DIM) -> BinaryHead:
    """A `BinaryHead` from a .pt/.pth/.npz of its state dict (strict, prefix detected)."""
    head = BinaryHead(embedding_dim)
    load_strict(head, read_checkpoint(path))
    return head.eval()


def load_multilabel_head(path: Path, embedding_dim: int = EMBEDDING_DIM) -> MultilabelHead:
    """A `MultilabelHead` from a .pt/.pth/.npz of its state dict (strict, prefix detected)."""
    head = MultilabelHead(embedding_dim)
    load_strict(head, read_checkpoint(path))
    return head.eval()

"""The body-part regression network of bpreg (DESIGN.md section 9), written here in plain torch.

VGG16's convolutional part (configuration D: thirteen 3x3 convolutions with ReLU in five
blocks, each block closed by a 2x2 max-pool) whose first convolution reads one channel and has
no bias, then a 1x1 convolution 512 -> 512 (``conv6``) with ReLU, the mean over height and
width, and a linear layer 512 -> 1 (``fc7``): one score per slice, linear in body height.

The layers sit in an ``nn.Sequential`` called ``model`` so that the state-dict keys are
bpreg's (``model.0.weight``, ``model.2.weight``, ``model.2.bias``, ..., ``conv6.*``,
``fc7.*``; ../shared/reference/bpr_keys.tsv) and bpreg's public ``model.pt`` loads as it is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from services.core.arrays import Float32Array

INPUT_CHANNELS = 1
INPUT_SIZE = 128
FEATURES = 512
# VGG configuration D: output channels of each 3x3 convolution, "M" for a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip
# Demo weights: biases small enough that the ReLU network stays in its linear-ish regime.
DEMO_BIAS_STD = 0.01


def vgg16_features(in_channels: int = INPUT_CHANNELS) -> nn.Sequential:
    """VGG16's ``features`` with a bias-free first convolution reading ``in_channels``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for entry in VGG16_LAYOUT:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(entry, int)
        first = not layers
        layers.append(nn.Conv2d(channels, entry, kernel_size=3, padding=1, bias=not first))
        layers.append(nn.ReLU(inplace=True))
        channels = entry
    return nn.Sequential(*layers)


class BodyPartRegressionNet(nn.Module):
    """``[N, 1, 128, 128]`` slices (HU window mapped to [-1, 1]) -> ``[N, 1]`` scores."""

    def __init__(self) -> None:
        super().__init__()
        self.model = vgg16_features()
        self.conv6 = nn.Conv2d(FEATURES, FEATURES, kernel_size=1)
        self.fc7 = nn.Linear(FEATURES, 1)

    def forward(self, slices: Tensor) -> Tensor:
        features = torch.relu(self.conv6(self.model(slices)))
        return self.fc7(features.mean(dim=(2, 3)))


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the network needs, in state-dict order."""
    return {key: tuple(value.shape) for key, value in BodyPartRegressionNet().state_dict().items()}


def demo_state_dict(seed: int = 0) -> dict[str, Float32Array]:
    """Seeded DEMO weights under bpreg's keys (numpy, reproducible on any platform).

    He-normal weights (fan-in) keep the activations at a sensible scale through the 15
    layers; they mean nothing anatomically.
    """
    generator = np.random.default_rng(seed)
    weights: dict[str, Float32Array] = {}
    for key, shape in expected_shapes().items():
        if key.endswith("bias"):
            values = generator.normal(0.0, DEMO_BIAS_STD, size=shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            values = generator.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        weights[key] = values.astype(np.float32)
    return weights

"""Depthwise-separable 1-D CNN, the usual small model for inertial sensor windows.

Each block is a depthwise convolution along time (one filter per channel,
``groups = in_channels``, 'same' padding) followed by a pointwise 1×1
convolution that mixes channels, then ReLU (the MobileNet factorisation,
Howard et al. 2017, in 1-D). Global average pooling over time and a linear
classifier follow. There is no BatchNorm, so the flat parameter vector is the
whole model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import nn
from torch.nn import functional as F

from raysim.models.base import MODELS


class DSCNNConfig(BaseModel):
    """``model: {name: dscnn, channels: [16, 32], kernel_size: 5}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["dscnn"] = "dscnn"
    channels: tuple[PositiveInt, ...] = (16, 32)  # output channels of each depthwise-separable block
    kernel_size: PositiveInt = 5  # temporal extent of every depthwise filter


class DepthwiseSeparable1d(nn.Module):
    """depthwise Conv1d(k, groups=C_in, 'same') → pointwise Conv1d(1×1) → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(in_channels, in_channels, kernel_size, groups=in_channels)
        self.pointwise = nn.Conv1d(in_channels, out_channels, 1)
        # 'same' padding as torch pads it (the extra zero of an even kernel goes on the right),
        # done explicitly so even kernels take the fast path without a warning.
        self._padding = ((kernel_size - 1) // 2, kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pointwise(self.depthwise(F.pad(x, self._padding))))

    def forward_stacked(self, params: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
        """S blocks at once on h (S, C, B, T) → (S, O, B, T): sensor, channel, sample, time.

        In this layout the S·C depthwise filters are one depthwise 2-D
        convolution of a single image with S·C channels (kernel 1 × k, so samples
        never mix), and the S pointwise filters are one batched matrix product
        over all B·T (sample, time) columns, with no transposes between blocks.
        """
        depth_w = params[f"{prefix}depthwise.weight"]  # (S, C, 1, k)
        point_w = params[f"{prefix}pointwise.weight"][..., 0]  # (S, O, C)
        sensors, channels, batch, window = h.shape
        h = F.conv2d(F.pad(h.reshape(1, sensors * channels, batch, window), self._padding),
                     depth_w.reshape(sensors * channels, 1, 1, -1), params[f"{prefix}depthwise.bias"].reshape(-1),
                     groups=sensors * channels)
        out = torch.baddbmm(params[f"{prefix}pointwise.bias"].unsqueeze(-1), point_w,
                            h.view(sensors, channels, batch * window))
        return torch.relu(out).view(sensors, -1, batch, window)


class DSCNN(nn.Module):
    """x (n, C, T) → blocks → mean over T → Linear → logits (n, classes)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], kernel_size: int, classes: int) -> None:
        super().__init__()
        blocks = []
        width = in_channels
        for out in widths:
            blocks.append(DepthwiseSeparable1d(width, out, kernel_size))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(width, classes)
        # He initialisation (normal, fan-in; bias 0). PyTorch's default uniform ±1/√fan_in shrinks the signal
        # block by block without BatchNorm, and the network then sits at chance for hundreds of steps.
        for block in blocks:
            nn.init.kaiming_normal_(block.depthwise.weight, nonlinearity="linear")
            nn.init.kaiming_normal_(block.pointwise.weight, nonlinearity="relu")
            nn.init.zeros_(block.depthwise.bias)
            nn.init.zeros_(block.pointwise.bias)

    head = "classifier."  # name prefix of the classifier's parameters: FedPer's usual personal layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the classifier reads: the last block's output averaged over time, (n, width)."""
        return self.blocks(x).mean(dim=-1)

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The classifier: features → logits."""
        return self.classifier(h)

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """S models at once: ``params`` stacked (S, *shape), x (S, B, C, T) → logits (S, B, classes).

        The blocks run on the cohort laid out (S, C, B, T) (see
        :meth:`DepthwiseSeparable1d.forward_stacked`): grouped convolutions under
        ``torch.func.vmap`` do not batch, but one depthwise convolution with S·C
        groups and batched matrix products do. The classifier is one batched
        matrix product too.
        """
        return self.classify_batched(params, self.features_batched(params, x))

    def features_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of S models at once: x (S, B, C, T) → (S, B, width)."""
        h = x.transpose(1, 2)  # (S, C, B, T); the first convolution reads it strided, once
        for index, block in enumerate(self.blocks):
            h = block.forward_stacked(params, f"blocks.{index}.", h)
        return h.mean(dim=-1).transpose(1, 2)

    def classify_batched(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """The classifier of S models: features (S, B, width) → logits (S, B, classes)."""
        weight, bias = params["classifier.weight"], params["classifier.bias"]
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


@MODELS.register("dscnn", DSCNNConfig)
def build_dscnn(config: DSCNNConfig, channels: int, window: int, classes: int) -> nn.Module:
    return DSCNN(channels, tuple(config.channels), config.kernel_size, classes)

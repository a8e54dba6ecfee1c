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

    def forward_batched(self, params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
        """S blocks at once on x (S, B, C, T): the depthwise filter as a sum over unfolded windows,
        the pointwise one as a batched matrix product (grouped convolutions do not batch well)."""
        depth_w = params[f"{prefix}depthwise.weight"][:, :, 0, :]  # (S, C, k)
        depth_b = params[f"{prefix}depthwise.bias"]  # (S, C)
        point_w = params[f"{prefix}pointwise.weight"][:, :, :, 0]  # (S, O, C)
        point_b = params[f"{prefix}pointwise.bias"]  # (S, O)
        windows = F.pad(x, self._padding).unfold(-1, depth_w.shape[-1], 1)  # (S, B, C, T, k)
        h = (windows * depth_w[:, None, :, None, :]).sum(-1) + depth_b[:, None, :, None]  # (S, B, C, T)
        S, B, C, T = h.shape
        flat = h.permute(0, 1, 3, 2).reshape(S, B * T, C)  # every (sample, time) row
        out = torch.baddbmm(point_b.unsqueeze(1), flat, point_w.transpose(1, 2))  # (S, B·T, O)
        return torch.relu(out.view(S, B, T, -1).permute(0, 1, 3, 2))  # (S, B, O, T)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).mean(dim=-1))

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """S models at once: ``params`` stacked (S, *shape), x (S, B, C, T) → logits (S, B, classes)."""
        h = x
        for index, block in enumerate(self.blocks):
            h = block.forward_batched(params, f"blocks.{index}.", h)
        pooled = h.mean(dim=-1)  # (S, B, width)
        weight, bias = params["classifier.weight"], params["classifier.bias"]
        return torch.baddbmm(bias.unsqueeze(1), pooled, weight.transpose(1, 2))


@MODELS.register("dscnn", DSCNNConfig)
def build_dscnn(config: DSCNNConfig, channels: int, window: int, classes: int) -> nn.Module:
    return DSCNN(channels, tuple(config.channels), config.kernel_size, classes)

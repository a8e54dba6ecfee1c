"""Multi-layer perceptron over the flattened window."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import nn

from raysim.models.base import MODELS

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLPConfig(BaseModel):
    """``model: {name: mlp, hidden: [64]}``; ``hidden: []`` is multinomial logistic regression."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["mlp"] = "mlp"
    hidden: tuple[PositiveInt, ...] = (64,)  # widths of the hidden layers, input side first
    activation: Literal["relu", "tanh"] = "relu"


class MLP(nn.Module):
    """x (n, C, T) → flatten (n, C·T) → [Linear → activation]* → Linear → logits (n, classes)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], classes: int, activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), _ACTIVATIONS[activation]()]
            width = out
        layers.append(nn.Linear(width, classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """S models at once: ``params`` stacked (S, *shape) per name, x (S, B, C, T) → logits (S, B, classes).

        Each layer is one batched matrix product (``baddbmm``), so a whole cohort
        costs a handful of kernels per step whatever its size.
        """
        h = x.flatten(2)
        for index, layer in enumerate(self.layers):
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"layers.{index}.weight"], params[f"layers.{index}.bias"]
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif not isinstance(layer, nn.Flatten):
                h = layer(h)  # an elementwise activation
        return h


@MODELS.register("mlp", MLPConfig)
def build_mlp(config: MLPConfig, channels: int, window: int, classes: int) -> nn.Module:
    return MLP(channels * window, tuple(config.hidden), classes, config.activation)

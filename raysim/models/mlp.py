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

    @property
    def head(self) -> str:
        """Name prefix of the classifier's parameters (the last linear layer): FedPer's usual personal layer."""
        return f"layers.{len(self.layers) - 1}."

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the classifier reads: the last hidden activation (the flattened window without one)."""
        return self.layers[:-1](x)

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """The classifier (last linear layer): features → logits."""
        return self.layers[-1](h)

    def forward_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """S models at once: ``params`` stacked (S, *shape) per name, x (S, B, C, T) → logits (S, B, classes).

        Each layer is one batched matrix product (``baddbmm``), so a whole cohort
        costs a handful of kernels per step whatever its size.
        """
        return self.classify_batched(params, self.features_batched(params, x))

    def features_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of S models at once: x (S, B, C, T) → (S, B, width)."""
        h = x.flatten(2)
        for index, layer in enumerate(self.layers[:-1]):
            if isinstance(layer, nn.Linear):
                weight, bias = params[f"layers.{index}.weight"], params[f"layers.{index}.bias"]
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            elif not isinstance(layer, nn.Flatten):
                h = layer(h)  # an elementwise activation
        return h

    def classify_batched(self, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """The last linear layer of S models: features (S, B, width) → logits (S, B, classes)."""
        weight, bias = params[f"{self.head}weight"], params[f"{self.head}bias"]
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


    @torch.no_grad()
    def sgd_step_batched(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         mask: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """One plain SGD step of S models at once, in place: w ← w − η_s·∇L_s(w); returns the losses L_s (S,).

        ``params`` are views into the stacked weights (S, *shape), x (S, B, C, T),
        y (S, B), ``mask`` (S, B) marks each sensor's real rows and L_s is the
        mean cross-entropy over them, ``lr`` (S,). The backward pass is written
        out (∂L/∂z = (softmax(z) − onehot(y))·mask/m at the logits, then back
        through each layer with the old weights), and each weight update is one
        in-place batched product W ← W − η_s·δᵀa, so no gradient tensor is ever
        stored. Equal to autograd followed by the update up to float rounding.
        """
        linear = [index for index, layer in enumerate(self.layers) if isinstance(layer, nn.Linear)]
        inputs, pre = [], []  # each linear layer's input activation and the pre-activation after it
        h = x.flatten(2)
        for index in linear:
            inputs.append(h)
            z = torch.baddbmm(params[f"layers.{index}.bias"].unsqueeze(1), h,
                              params[f"layers.{index}.weight"].transpose(1, 2))
            pre.append(z)
            h = self.layers[index + 1](z) if index != linear[-1] else z
        log_p = torch.log_softmax(h, dim=-1)
        rows = mask.sum(1).to(h.dtype)  # m_s
        per_sample = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        losses = torch.where(mask, per_sample, 0.0).sum(1) / rows
        delta = log_p.exp_()  # softmax, then minus one-hot, scaled: ∂L_s/∂z
        delta.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(delta[..., :1], -1.0))
        delta.mul_((mask / rows.unsqueeze(1)).unsqueeze(-1))
        deltas = [delta]
        for k in range(len(linear) - 1, 0, -1):  # back through the old weights, before any update
            back = torch.bmm(deltas[0], params[f"layers.{linear[k]}.weight"])
            deltas.insert(0, back.mul_(_activation_grad(self.layers[linear[k - 1] + 1], pre[k - 1])))
        step = -lr.view(-1, 1, 1)
        for index, a, d in zip(linear, inputs, deltas):
            scaled = d * step
            params[f"layers.{index}.weight"].baddbmm_(scaled.transpose(1, 2), a)
            params[f"layers.{index}.bias"].add_(scaled.sum(1))
        return losses


def _activation_grad(activation: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """d activation(z) / dz, elementwise."""
    if isinstance(activation, nn.ReLU):
        return (z > 0).to(z.dtype)
    t = torch.tanh(z)
    return 1 - t * t


@MODELS.register("mlp", MLPConfig)
def build_mlp(config: MLPConfig, channels: int, window: int, classes: int) -> nn.Module:
    return MLP(channels * window, tuple(config.hidden), classes, config.activation)

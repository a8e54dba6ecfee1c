"""The model registry and the seeded constructors every model family shares.

A model factory takes ``(config, channels, window, classes)`` and returns a
``torch.nn.Module`` mapping float32 ``(n, channels, window)`` to logits
``(n, classes)``. Models keep all their state in parameters (no BatchNorm, no
buffers), so a flat float32 vector is the whole model.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from raysim.models.layout import ParamLayout
from raysim.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def build_model(config: BaseModel, channels: int, window: int, classes: int, seed: int = 0) -> nn.Module:
    """Build the module ``config`` names, initialised from ``seed``.

    The global torch RNG is left exactly as it was: initialisation draws from
    the CPU default generator inside ``torch.random.fork_rng``, seeded with
    ``seed``, which restores the previous state on exit.
    """
    for what, value in (("channels", channels), ("window", window), ("classes", classes)):
        if int(value) < 1:
            raise ValueError(f"{what} must be at least 1, got {value}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        module = MODELS.build(config, int(channels), int(window), int(classes))
    return module


def init_weights(config: BaseModel, channels: int, window: int, classes: int, seed: int) -> np.ndarray:
    """Initial weights as a flat float32 vector; the same seed gives the same vector."""
    module = build_model(config, channels, window, classes, seed=seed)
    return ParamLayout.of(module).flatten(module)


def training_flops_per_sample(module: nn.Module, channels: int, window: int) -> float:
    """FLOPs of one training sample: 3 × the forward pass (the backward pass costs about two forwards),
    the forward counted by ``torch.utils.flop_counter`` on one window."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(1, int(channels), int(window)))
    return 3.0 * float(counter.get_total_flops())

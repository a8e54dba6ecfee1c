"""Asynchronous aggregation: FedAsync and FedBuff, with staleness functions.

A sensor trains from the model version current at its dispatch; its update
Δ_i is taken against that version, and its staleness τ_i is the number of
server steps between that version and the one it is applied to.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from raysim.errors import AggregationError
from raysim.strategies import STRATEGIES, weighted_mean


class Staleness(BaseModel):
    """s(τ): how much an update τ versions old still counts (Xie et al. 2019, §5.2)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    function: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: NonNegativeFloat = 0.5  # polynomial exponent, or hinge slope
    b: NonNegativeInt = 4  # hinge: updates up to b versions old count fully


def staleness_weight(staleness: np.ndarray, config: Staleness) -> np.ndarray:
    """s(τ) for each τ ≥ 0; s(0) = 1 and s is non-increasing.

        constant:   s(τ) = 1
        polynomial: s(τ) = (1 + τ)^(−a)
        hinge:      s(τ) = 1 if τ ≤ b, else 1 / (a·(τ − b) + 1)
    """
    tau = np.asarray(staleness, dtype=np.float64)
    if (tau < 0).any():
        raise AggregationError(f"staleness must be non-negative, got {tau.min():g}")
    if config.function == "constant":
        return np.ones_like(tau)
    if config.function == "polynomial":
        return (1.0 + tau) ** (-config.a)
    return 1.0 / (config.a * np.maximum(tau - config.b, 0.0) + 1.0)


def fedbuff_step(
    global_weights: np.ndarray, deltas: np.ndarray, weights: np.ndarray, server_lr: float
) -> np.ndarray:
    """One FedBuff server step (Nguyen et al., AISTATS 2022, Alg. 1).

        x ← x + η_g · Σ_i w_i Δ_i / Σ_i w_i,   w_i = s(τ_i) (uniform) or s(τ_i)·n_i (sample-weighted)

    The paper's uniform 1/K average is the case w_i = s(τ_i) with every τ_i = 0.
    """
    return (global_weights + server_lr * weighted_mean(deltas, weights)).astype(np.float32)


def fedasync_step(
    global_weights: np.ndarray, base_weights: np.ndarray, delta: np.ndarray, mixing: float
) -> np.ndarray:
    """One FedAsync server update (Xie et al. 2019, Alg. 1, option with staleness).

        x ← (1 − α_t)·x + α_t·x_new,   x_new = x_base + Δ,   α_t = α·s(τ)

    With α_t = 1 the global model is replaced by the arriving one.
    """
    local = base_weights.astype(np.float64) + delta
    return ((1.0 - mixing) * global_weights + mixing * local).astype(np.float32)


class AsyncConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    modes: ClassVar[tuple[str, ...]] = ("async",)

    concurrency: PositiveInt = 100  # C: sensors training at once
    max_staleness: NonNegativeInt = 20  # updates staler than this are dropped as late
    staleness: Staleness = Staleness()


class FedBuffConfig(AsyncConfig):
    name: Literal["fedbuff"] = "fedbuff"
    buffer_size: PositiveInt = 10  # K: updates per server step
    server_lr: PositiveFloat = 1.0  # η_g
    weighting: Literal["uniform", "samples"] = "uniform"


class FedAsyncConfig(AsyncConfig):
    name: Literal["fedasync"] = "fedasync"
    alpha: float = Field(0.6, gt=0, le=1)  # α: base mixing weight


class FedBuff:
    """Buffered asynchronous aggregation: a server step every K delivered updates."""

    def __init__(self, config: FedBuffConfig) -> None:
        self.config = config
        self.buffer_size = config.buffer_size

    def step(self, global_weights, base_weights, deltas, staleness, num_samples) -> np.ndarray:
        weights = staleness_weight(staleness, self.config.staleness)
        if self.config.weighting == "samples":
            weights = weights * num_samples
        return fedbuff_step(global_weights, deltas, weights, self.config.server_lr)


class FedAsync:
    """Fully asynchronous aggregation: every delivered update is mixed into the model at once."""

    buffer_size = 1

    def __init__(self, config: FedAsyncConfig) -> None:
        self.config = config

    def step(self, global_weights, base_weights, deltas, staleness, num_samples) -> np.ndarray:
        mixing = self.config.alpha * float(staleness_weight(staleness[:1], self.config.staleness)[0])
        return fedasync_step(global_weights, base_weights[0], deltas[0], mixing)


STRATEGIES.register("fedbuff", FedBuffConfig)(FedBuff)
STRATEGIES.register("fedasync", FedAsyncConfig)(FedAsync)

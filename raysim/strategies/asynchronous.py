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
from raysim.strategies import STRATEGIES, Combine, ServerContext, Stateless, UpdateBatch, weighted_mean


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


class AsyncConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    modes: ClassVar[tuple[str, ...]] = ("async",)

    concurrency: PositiveInt = 100  # C: sensors training at once
    max_staleness: NonNegativeInt = 20  # updates staler than this are dropped as late
    staleness: Staleness = Staleness()
    prox_mu: NonNegativeFloat = 0.0  # μ of a FedProx proximal term in local training (0 = none)


class FedBuffConfig(AsyncConfig):
    name: Literal["fedbuff"] = "fedbuff"
    buffer_size: PositiveInt = 10  # K: updates per server step
    server_lr: PositiveFloat = 1.0  # η_g
    weighting: Literal["uniform", "samples"] = "uniform"


class FedAsyncConfig(AsyncConfig):
    name: Literal["fedasync"] = "fedasync"
    alpha: float = Field(0.6, gt=0, le=1)  # α: base mixing weight


class FedBuff(Stateless):
    """FedBuff (Nguyen et al., AISTATS 2022, Alg. 1): a server step every K delivered updates.

        Δ_t = η_g · combine(Δ_i, w_i),   w_i = s(τ_i) (uniform) or s(τ_i)·n_i (sample-weighted)

    The paper's uniform 1/K average is the weighted mean with every τ_i = 0.
    """

    def __init__(self, config: FedBuffConfig, context: ServerContext | None = None) -> None:
        self.config = config
        self.buffer_size = config.buffer_size

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine = weighted_mean) -> np.ndarray:
        weights = staleness_weight(batch.staleness, self.config.staleness)
        if self.config.weighting == "samples":
            weights = weights * batch.num_samples
        return self.config.server_lr * np.asarray(combine(batch.deltas, weights), dtype=np.float64)

    def client(self) -> dict[str, float]:
        return {"prox_mu": self.config.prox_mu, "scaffold": 0}


class FedAsync(Stateless):
    """FedAsync (Xie et al. 2019, Alg. 1 with staleness): every delivered update is mixed in at once.

        x ← (1 − α_t)·x + α_t·(x_base + Δ),   α_t = α·s(τ);   as a pseudo-gradient, Δ_t = α_t·(x_base + Δ − x)

    With α_t = 1 the global model is replaced by the arriving one.
    """

    buffer_size = 1

    def __init__(self, config: FedAsyncConfig, context: ServerContext | None = None) -> None:
        self.config = config

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine = weighted_mean) -> np.ndarray:
        mixing = self.config.alpha * float(staleness_weight(batch.staleness[:1], self.config.staleness)[0])
        local = batch.base_weights[0].astype(np.float64) + batch.deltas[0]
        return mixing * (local - global_weights)

    def client(self) -> dict[str, float]:
        return {"prox_mu": self.config.prox_mu, "scaffold": 0}


STRATEGIES.register("fedbuff", FedBuffConfig)(FedBuff)
STRATEGIES.register("fedasync", FedAsyncConfig)(FedAsync)

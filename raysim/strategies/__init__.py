"""Aggregation strategies: pure kernels over stacked flat updates, and a registry.

A strategy turns the cohort's updates (``(n, d)`` float32 deltas against the
global model they were trained from) into the next global model. Kernels take
arrays and return new arrays; nothing here knows about Ray.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveFloat

from raysim.errors import AggregationError
from raysim.registry import Registry


class Strategy(Protocol):
    """Synchronous server-side aggregation of one round's updates."""

    def aggregate(self, global_weights: np.ndarray, updates: np.ndarray, num_samples: np.ndarray) -> np.ndarray:
        """Return the new global weights from ``updates`` (n, d) and each update's sample count (n,)."""
        ...


class AsyncStrategy(Protocol):
    """Asynchronous server step over a buffer of (possibly stale) updates."""

    buffer_size: int  # delivered updates per server step

    def step(
        self,
        global_weights: np.ndarray,
        base_weights: np.ndarray,  # (n, d): the version each update was trained from
        deltas: np.ndarray,  # (n, d)
        staleness: np.ndarray,  # (n,) server steps since each base version
        num_samples: np.ndarray,  # (n,)
    ) -> np.ndarray: ...


STRATEGIES: Registry[Strategy] = Registry("aggregation.strategy")


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_i w_i·u_i / Σ_i w_i over the rows of ``updates``, accumulated in float64.

    The row order does not change the result beyond float64 rounding, and the
    mean of identical rows is that row exactly.
    """
    updates = np.asarray(updates)
    weights = np.asarray(weights, dtype=np.float64)
    if updates.ndim != 2 or weights.shape != (updates.shape[0],):
        raise AggregationError(
            f"weighted_mean needs updates of shape (n, d) and n weights, got {updates.shape} and {weights.shape}"
        )
    if updates.shape[0] == 0:
        raise AggregationError("weighted_mean needs at least one update")
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise AggregationError("weighted_mean needs finite, non-negative weights")
    total = weights.sum()
    if total <= 0:
        raise AggregationError("weighted_mean needs weights with a positive sum")
    mean = (weights / total) @ updates.astype(np.float64, copy=False)
    return mean.astype(updates.dtype, copy=False)


class FedAvgConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    modes: ClassVar[tuple[str, ...]] = ("sync",)

    name: Literal["fedavg"] = "fedavg"
    weighting: Literal["samples", "uniform"] = "samples"  # p_k ∝ n_k (McMahan et al.) or uniform
    server_lr: PositiveFloat = 1.0  # η_g; 1 is plain FedAvg


class FedAvg:
    """Federated averaging (McMahan et al., AISTATS 2017, Alg. 1).

        x ← x + η_g · Σ_k p_k Δ_k,   p_k = n_k / Σ_j n_j   (or 1/K with uniform weighting)

    Δ_k is sensor k's local model minus the global model it started from.
    """

    def __init__(self, config: FedAvgConfig) -> None:
        self.config = config

    def aggregate(self, global_weights: np.ndarray, updates: np.ndarray, num_samples: np.ndarray) -> np.ndarray:
        weights = np.ones(len(updates)) if self.config.weighting == "uniform" else num_samples
        step = weighted_mean(updates, weights)
        return (global_weights + self.config.server_lr * step).astype(np.float32)


STRATEGIES.register("fedavg", FedAvgConfig)(FedAvg)

# Registers FedBuff and FedAsync (imported for that side effect, after the registry exists).
from raysim.strategies import asynchronous  # noqa: E402,F401

__all__ = ["STRATEGIES", "AsyncStrategy", "FedAvg", "FedAvgConfig", "Strategy", "weighted_mean"]

"""Aggregation strategies: pure kernels over stacked flat updates, and a registry.

A strategy turns a step's updates (``(n, d)`` float32 deltas against the
models they were trained from) into a pseudo-gradient, which the server
optimizer applies to the global model. Kernels take arrays and return new
arrays; nothing here knows about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, PositiveFloat

from raysim.errors import AggregationError
from raysim.registry import Registry


@dataclass
class UpdateBatch:
    """The accepted updates of one server step, and what is known about each (rows aligned)."""

    deltas: np.ndarray  # (n, d) float32: local model minus the base model it trained from
    num_samples: np.ndarray  # (n,) training samples of each sensor
    staleness: np.ndarray | None = None  # (n,) server steps since each base version; None = all 0 (sync)
    steps: np.ndarray | None = None  # (n,) local SGD steps taken (FedNova)
    lr: np.ndarray | None = None  # (n,) local learning rate used (FedNova, SCAFFOLD)
    base_weights: np.ndarray | None = None  # (n, d) the base models (FedAsync)
    controls: np.ndarray | None = None  # (n, d) control-variate changes c_i⁺ − c_i (SCAFFOLD)

    def __post_init__(self) -> None:
        if self.staleness is None:
            self.staleness = np.zeros(len(self.deltas), dtype=np.int64)


@dataclass(frozen=True)
class ServerContext:
    """What a strategy may need to know of the run when it is built."""

    fleet_size: int = 1
    dim: int = 0  # length of the flat weight vector
    momentum: float = 0.0  # local SGD momentum ρ (training.momentum)


# (updates (n, d), weights (n,)) → their combination (d,): the weighted mean, or a robust aggregator.
Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Strategy(Protocol):
    """Server side of an algorithm: turns a step's updates into a pseudo-gradient Δ_t.

    The coordinator applies Δ_t with the scenario's server optimizer
    (x ← x + Δ_t by default). ``combine`` is how the strategy averages rows:
    the weighted mean, or clipping then a robust aggregator if configured.
    """

    buffer_size: int  # async: delivered updates per server step (sync: unused)

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine) -> np.ndarray: ...

    def client(self) -> dict[str, float]:
        """What client actors need to know of the algorithm: ``prox_mu`` and ``scaffold`` (0 or 1)."""
        ...

    def broadcast(self) -> np.ndarray | None:
        """Server state sent to the sensors with the model (SCAFFOLD's control variate), or None."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server state to keep in checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict` (resuming a run)."""
        ...


class Stateless:
    """For strategies whose only server state is the global model."""

    def broadcast(self) -> np.ndarray | None:
        return None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise AggregationError(f"{type(self).__name__} keeps no server state, got {sorted(state)}")


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


class FedAvg(Stateless):
    """Federated averaging (McMahan et al., AISTATS 2017, Alg. 1).

        x ← x + η_g · Σ_k p_k Δ_k,   p_k = n_k / Σ_j n_j   (or 1/K with uniform weighting)

    Δ_k is sensor k's local model minus the global model it started from.
    """

    buffer_size = 0

    def __init__(self, config: FedAvgConfig, context: ServerContext | None = None) -> None:
        self.config = config

    def weights(self, batch: UpdateBatch) -> np.ndarray:
        return np.ones(len(batch.deltas)) if self.config.weighting == "uniform" else batch.num_samples

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine = weighted_mean) -> np.ndarray:
        return self.from_mean(combine(batch.deltas, self.weights(batch)))

    def from_mean(self, mean: np.ndarray) -> np.ndarray:
        """The pseudo-gradient η_g · Σ_k p_k Δ_k from the weighted mean Σ_k p_k Δ_k, however it was summed
        (client actors may each sum their own sensors' share; see ``cluster.aggregate_on_actors``)."""
        return self.config.server_lr * np.asarray(mean, dtype=np.float64)

    def client(self) -> dict[str, float]:
        return {"prox_mu": 0.0, "scaffold": 0}


STRATEGIES.register("fedavg", FedAvgConfig)(FedAvg)


def client_settings(config: BaseModel) -> dict[str, float]:
    """What the client actors need to know of the strategy ``config`` names (see :meth:`Strategy.client`)."""
    return STRATEGIES.build(config, ServerContext()).client()

# Register FedProx, SCAFFOLD, FedNova, FedBuff and FedAsync (imported for that side effect, after the registry exists).
from raysim.strategies import asynchronous, drift  # noqa: E402,F401

__all__ = ["STRATEGIES", "Combine", "FedAvg", "FedAvgConfig", "ServerContext", "Stateless", "Strategy", "UpdateBatch",
           "client_settings", "weighted_mean"]

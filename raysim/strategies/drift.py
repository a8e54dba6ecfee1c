"""Algorithms against client drift on non-IID sensors: FedProx, SCAFFOLD, FedNova.

Each has a client part, run by the client actors inside local SGD (see
:mod:`raysim.training` for the step rule), and a server part here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat

from raysim.errors import AggregationError
from raysim.strategies import STRATEGIES, Combine, FedAvg, FedAvgConfig, ServerContext, Stateless, UpdateBatch, weighted_mean


class FedProxConfig(FedAvgConfig):
    name: Literal["fedprox"] = "fedprox"  # type: ignore[assignment]
    mu: NonNegativeFloat = 0.01  # μ: weight of the proximal term; 0 is FedAvg


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): local SGD on L(w) + μ/2·‖w − w_global‖², FedAvg on the server.

    The proximal term keeps each sensor's local model near the global one;
    μ = 0 is FedAvg exactly.
    """

    def client(self) -> dict[str, float]:
        return {"prox_mu": self.config.mu, "scaffold": 0}


class ScaffoldConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    modes: ClassVar[tuple[str, ...]] = ("sync",)

    name: Literal["scaffold"] = "scaffold"
    server_lr: PositiveFloat = 1.0  # η_g
    weighting: Literal["samples", "uniform"] = "uniform"  # the paper averages uniformly


class Scaffold:
    """SCAFFOLD (Karimireddy et al., ICML 2020), option II control variates.

    Sensor i corrects every local gradient by c − c_i and, after K_i steps of
    rate η_i, updates its control c_i⁺ = c_i − c − Δ_i/(K_i·η_i), uploading
    Δ_i and Δc_i = c_i⁺ − c_i (twice the bytes). The server then steps

        x ← x + η_g · mean(Δ_i),   c ← c + (|S|/N) · mean(Δc_i)

    with |S| the sensors aggregated and N the fleet size. The control c
    travels with the model (twice the download too).
    """

    buffer_size = 0

    def __init__(self, config: ScaffoldConfig, context: ServerContext) -> None:
        self.config = config
        self.fleet_size = context.fleet_size
        self.control = np.zeros(context.dim, dtype=np.float32)  # c

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine = weighted_mean) -> np.ndarray:
        if batch.controls is None:
            raise AggregationError("SCAFFOLD needs each update's control-variate change")
        weights = np.ones(len(batch.deltas)) if self.config.weighting == "uniform" else batch.num_samples
        share = len(batch.deltas) / self.fleet_size
        self.control = (self.control + share * batch.controls.astype(np.float64).mean(axis=0)).astype(np.float32)
        return self.config.server_lr * np.asarray(combine(batch.deltas, weights), dtype=np.float64)

    def client(self) -> dict[str, float]:
        return {"prox_mu": 0.0, "scaffold": 1}

    def broadcast(self) -> np.ndarray | None:
        return self.control

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"control": self.control}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        control = np.asarray(state["control"], dtype=np.float32)
        if control.shape != self.control.shape:
            raise AggregationError(f"SCAFFOLD control must have shape {self.control.shape}, got {control.shape}")
        self.control = control.copy()


class FedNovaConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    modes: ClassVar[tuple[str, ...]] = ("sync",)

    name: Literal["fednova"] = "fednova"
    server_lr: PositiveFloat = 1.0  # η_g
    mu: NonNegativeFloat = 0.0  # μ of a proximal term in local training (the FedProx variant of the normalizer)


def fednova_normalizer(steps: np.ndarray, lr: np.ndarray, momentum: float, prox_mu: float) -> np.ndarray:
    """a_i, the norm of sensor i's local-step weights (Wang et al., NeurIPS 2020, §4 and App. B).

        plain SGD:      a_i = τ_i
        momentum ρ:     a_i = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)] / (1 − ρ)
        proximal μ:     a_i = [1 − (1 − η_i μ)^τ_i] / (η_i μ)
    """
    tau = np.asarray(steps, dtype=np.float64)
    if momentum > 0:
        rho = momentum
        return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)
    if prox_mu > 0:
        decay = np.asarray(lr, dtype=np.float64) * prox_mu
        return (1.0 - (1.0 - decay) ** tau) / decay
    return tau


class FedNova(Stateless):
    """FedNova (Wang et al., NeurIPS 2020): normalized averaging for unequal local work.

    Each update is divided by its normalizer a_i (its number of local steps
    for plain SGD) before averaging, and the average is rescaled by the
    effective step count τ_eff = Σ p_i a_i:

        x ← x + η_g · τ_eff · Σ_i p_i Δ_i / a_i,   p_i = n_i / Σ n_j

    With equal local steps this is FedAvg; with unequal steps it removes the
    bias toward sensors that took more steps.
    """

    buffer_size = 0

    def __init__(self, config: FedNovaConfig, context: ServerContext) -> None:
        self.config = config
        self.momentum = context.momentum  # the normalizer follows training.momentum (ρ)

    def pseudo_gradient(self, global_weights: np.ndarray, batch: UpdateBatch, combine: Combine = weighted_mean) -> np.ndarray:
        if batch.steps is None or batch.lr is None:
            raise AggregationError("FedNova needs each update's local step count and learning rate")
        a = fednova_normalizer(batch.steps, batch.lr, self.momentum, self.config.mu)
        trained = a > 0  # a sensor that took no step has Δ = 0 and no say
        if not trained.any():
            return np.zeros(batch.deltas.shape[1])
        p = batch.num_samples[trained] / batch.num_samples[trained].sum()
        tau_eff = float(p @ a[trained])
        normalized = batch.deltas[trained] / a[trained, None].astype(np.float32)
        return self.config.server_lr * tau_eff * np.asarray(combine(normalized, p), dtype=np.float64)

    def client(self) -> dict[str, float]:
        return {"prox_mu": self.config.mu, "scaffold": 0}


STRATEGIES.register("fedprox", FedProxConfig)(FedProx)
STRATEGIES.register("scaffold", ScaffoldConfig)(Scaffold)
STRATEGIES.register("fednova", FedNovaConfig)(FedNova)

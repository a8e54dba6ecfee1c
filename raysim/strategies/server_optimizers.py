"""Server optimizers: how the global model moves along the aggregated update.

Any aggregator reduces a round's updates to one pseudo-gradient Δ_t, the
direction the cohort moved (new − old weights, not a loss gradient). A server
optimizer then takes the step from x_t to x_{t+1} (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Alg. 1–2), so every aggregator composes
with every optimizer; it runs last, after DP noise. State (m, v, step count)
is float64, created at the first step, and round-trips through ``np.savez``
for checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Annotated, ClassVar, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysim.errors import AggregationError
from raysim.registry import Registry


class ServerOptimizer(Protocol):
    """Applies the aggregated update Δ_t to the global weights x_t, keeping its own state."""

    def apply(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Return x_{t+1} (float32, (d,)) from x_t = ``weights`` (d,) and Δ_t = ``delta`` (d,)."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimizer state as arrays that ``np.savez`` can store."""
        ...

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict` (or the ``np.load`` of one)."""
        ...


SERVER_OPTIMIZERS: Registry[ServerOptimizer] = Registry("aggregation.server_optimizer")

PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Decay = Annotated[float, Field(ge=0, lt=1)]


class SGDConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["sgd"] = "sgd"
    lr: PositiveFinite = 1.0  # η; 1 is plain FedAvg


class AvgMConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["avgm"] = "avgm"
    lr: PositiveFinite = 1.0  # η; with β = 0 this is FedAvg
    momentum: Decay = 0.9  # β; a steady Δ is amplified to η·Δ/(1 − β)


class AdaptiveConfig(BaseModel):
    """Shared by FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021, Alg. 2 and §5)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: PositiveFinite = 1e-2  # η; tuned per task in the paper; a steady Δ moves each coordinate ≈ η per step
    beta1: Decay = 0.9  # β1: first-moment decay, the paper's experimental value
    tau: PositiveFinite = 1e-3  # τ: degree of adaptivity, the paper's experimental value; v_{-1} = τ²


class FedAdagradConfig(AdaptiveConfig):
    name: Literal["adagrad"] = "adagrad"
    lr: PositiveFinite = 1e-1  # η; v only grows, so the effective step decays like η/√t and needs a larger η


class FedAdamConfig(AdaptiveConfig):
    name: Literal["adam"] = "adam"
    beta2: Decay = 0.99  # β2: second-moment decay, the paper's experimental value


class FedYogiConfig(AdaptiveConfig):
    name: Literal["yogi"] = "yogi"
    beta2: Decay = 0.99  # β2


class _Stateful(ABC):
    """Shape checks, the step count and the float64 state vectors named in ``moments``."""

    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: BaseModel) -> None:
        self.config = config
        self.steps = 0  # server steps applied so far
        self._state: dict[str, np.ndarray] = {}

    @abstractmethod
    def _initial_state(self, size: int) -> dict[str, np.ndarray]:
        """The state before the first step, one (size,) vector per name in ``moments``."""

    @abstractmethod
    def _step(self, delta: np.ndarray) -> np.ndarray:
        """Advance the state by Δ_t (float64) and return x_{t+1} − x_t."""

    def apply(self, weights: np.ndarray, delta: np.ndarray) -> np.ndarray:
        weights = np.asarray(weights)
        delta = np.asarray(delta)
        if weights.ndim != 1 or delta.shape != weights.shape:
            raise AggregationError(
                "a server optimizer needs weights and delta of the same shape (d,), "
                f"got {weights.shape} and {delta.shape}"
            )
        if self._state and self._size() != weights.shape[0]:
            raise AggregationError(
                f"server optimizer state has {self._size()} weights, the model has {weights.shape[0]}"
            )
        # A NaN or inf would stay in m and v for every later step, so it is refused before the state changes.
        if not np.isfinite(delta).all():
            raise AggregationError("the aggregated update holds NaN or inf; the server optimizer refuses it")
        if not self._state:
            self._state = self._initial_state(weights.shape[0])
        step = self._step(delta.astype(np.float64))
        self.steps += 1
        return (weights.astype(np.float64) + step).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """``step`` (int64 scalar), plus one (d,) float64 array per moment once the first step ran."""
        return {"step": np.asarray(self.steps, dtype=np.int64)} | {k: v.copy() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        keys = set(state)
        if keys not in ({"step"}, {"step", *self.moments}):
            expected = ", ".join(("step", *self.moments))
            raise AggregationError(f"{type(self).__name__} state needs the keys {expected}, got {sorted(keys)}")
        step = np.asarray(state["step"])
        moments = {name: np.array(state[name], dtype=np.float64) for name in self.moments if name in keys}
        if step.shape != () or int(step) < 0:
            raise AggregationError(f"server optimizer state 'step' must be a non-negative scalar, got {step!r}")
        if len({m.shape for m in moments.values()}) > 1 or any(m.ndim != 1 for m in moments.values()):
            raise AggregationError("server optimizer state vectors must all have the same shape (d,)")
        self.steps = int(step)
        self._state = moments

    def _size(self) -> int:
        return next(iter(self._state.values())).shape[0]


class ServerSGD(_Stateful):
    """Plain server step (Reddi et al., ICLR 2021, Alg. 1 with SERVEROPT = SGD).

        x ← x + η·Δ

    With η = 1 this is FedAvg (McMahan et al., AISTATS 2017).
    """

    config: SGDConfig

    def _initial_state(self, size: int) -> dict[str, np.ndarray]:
        return {}

    def _step(self, delta: np.ndarray) -> np.ndarray:
        return self.config.lr * delta


class FedAvgM(_Stateful):
    """Server momentum (Hsu, Qi & Brown 2019, arXiv:1909.06335; a baseline in Reddi et al. 2021).

        m ← β·m + Δ,   x ← x + η·m,   m_{-1} = 0

    The paper writes Δ as old − new and subtracts; Δ here is new − old. β = 0, η = 1 is FedAvg.
    """

    config: AvgMConfig
    moments = ("m",)

    def _initial_state(self, size: int) -> dict[str, np.ndarray]:
        return {"m": np.zeros(size)}

    def _step(self, delta: np.ndarray) -> np.ndarray:
        m = self.config.momentum * self._state["m"] + delta
        self._state = {"m": m}
        return self.config.lr * m


class _Adaptive(_Stateful):
    """Reddi et al., ICLR 2021, Alg. 2, without bias correction:

        m ← β1·m + (1 − β1)·Δ,   v ← rule(v, Δ²),   x ← x + η·m / (√v + τ),   m_{-1} = 0,  v_{-1} = τ²

    The paper asks only v_{-1} ≥ τ²; τ² is its smallest choice.
    """

    config: AdaptiveConfig
    moments = ("m", "v")

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and Δ_t² (elementwise)."""

    def _initial_state(self, size: int) -> dict[str, np.ndarray]:
        return {"m": np.zeros(size), "v": np.full(size, self.config.tau**2)}

    def _step(self, delta: np.ndarray) -> np.ndarray:
        beta1 = self.config.beta1
        m = beta1 * self._state["m"] + (1.0 - beta1) * delta
        v = self._second_moment(self._state["v"], delta * delta)
        self._state = {"m": m, "v": v}
        return self.config.lr * m / (np.sqrt(v) + self.config.tau)


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al., ICLR 2021, Alg. 2): the adaptive step with

        v ← v + Δ²

    so v never decreases and steps shrink as updates accumulate. The paper's analysis takes β1 = 0.
    """

    config: FedAdagradConfig

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al., ICLR 2021, Alg. 2): the adaptive step with

        v ← β2·v + (1 − β2)·Δ²
    """

    config: FedAdamConfig

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.config.beta2 * v + (1.0 - self.config.beta2) * delta_sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al., ICLR 2021, Alg. 2; Yogi from Zaheer et al., NeurIPS 2018): the adaptive step with

        v ← v − (1 − β2)·Δ²·sign(v − Δ²)

    v moves by ±(1 − β2)·Δ², towards Δ², so it stays positive: it only decreases when
    Δ² < v, and then v_t > β2·v_{t-1}. It can fall below the initial τ² when updates shrink.
    """

    config: FedYogiConfig

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.config.beta2) * delta_sq * np.sign(v - delta_sq)


SERVER_OPTIMIZERS.register("sgd", SGDConfig)(ServerSGD)
SERVER_OPTIMIZERS.register("avgm", AvgMConfig)(FedAvgM)
SERVER_OPTIMIZERS.register("adagrad", FedAdagradConfig)(FedAdagrad)
SERVER_OPTIMIZERS.register("adam", FedAdamConfig)(FedAdam)
SERVER_OPTIMIZERS.register("yogi", FedYogiConfig)(FedYogi)

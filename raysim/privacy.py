"""Differential privacy for federated averaging: clipping, Gaussian noise, adaptive clipping, accounting.

Central mode is DP-FedAvg (McMahan et al., ICLR 2018, "Learning Differentially
Private Recurrent Language Models"): every update is clipped to L2 norm S, the
server sums the cohort, adds N(0, (z·S)²) per coordinate and divides by the
expected cohort size m. Local mode clips and noises each update on its sensor.
Adaptive clipping (Andrew et al., NeurIPS 2021, "Differentially Private
Learning with Adaptive Clipping", arXiv:1905.03871) moves S towards a quantile
of the update norms. Privacy is sensor-level (neighbouring fleets differ by one
sensor's whole data) and is accounted with Opacus's RDP accountant for the
Poisson-subsampled Gaussian mechanism, q = cohort / fleet.

The kernels are pure numpy with an explicit ``rng`` and raise
:class:`~raysim.errors.AggregationError` for updates they cannot use; the
accounting functions raise ``ValueError`` for impossible parameters, so a
pydantic validator can report them as a scenario error.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysim.errors import AggregationError
from raysim.strategies.robust import norm_clip, row_norms

NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AdaptiveClipping(BaseModel):
    """Quantile-based adaptive clipping with geometric updates (Andrew et al., NeurIPS 2021)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_quantile: float = Field(0.5, gt=0, lt=1)  # γ: fraction of updates left unclipped; 0.5 = the median
    clip_lr: PositiveFinite = 0.2  # η_C: C ← C·exp(−η_C·(b̃ − γ)); the paper's recommended rate
    count_noise: Optional[NonNegativeFinite] = None  # σ_b: noise std on the unclipped count; None = m/20 (paper)


class Privacy(BaseModel):
    """The scenario's ``privacy:`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["central", "local"] = "central"  # central: noise on the server's sum; local: noise on each sensor
    noise_multiplier: NonNegativeFinite  # z: noise std / clip bound; if adaptive, the z of both queries together
    clip_norm: PositiveFinite  # S: L2 bound on each update (the initial C if adaptive)
    delta: float = Field(1e-5, gt=0, lt=1)  # δ of the reported (ε, δ)
    target_epsilon: Optional[PositiveFinite] = None  # budget: no round may take ε above it
    on_budget: Literal["stop", "warn"] = "stop"  # stop before a round would exceed target_epsilon, or warn and go on
    adaptive: Optional[AdaptiveClipping] = None  # None = fixed clip_norm

    @model_validator(mode="after")
    def _consistent(self) -> Privacy:
        if self.target_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("target_epsilon needs noise_multiplier > 0: without noise ε is infinite after one round")
        if self.adaptive is not None:
            if self.mode != "central":
                raise ValueError("adaptive clipping needs mode central: the server must add noise to the clipped count")
            count_noise = self.adaptive.count_noise
            if count_noise is not None and self.noise_multiplier > 0 and not 2 * count_noise > self.noise_multiplier:
                raise ValueError(
                    f"adaptive.count_noise σ_b={count_noise} is too small for noise_multiplier "
                    f"z={self.noise_multiplier}: adaptive clipping needs 2·σ_b > z "
                    f"(raise count_noise above {self.noise_multiplier / 2} or lower z)"
                )
        return self

    def update_noise_multiplier(self, expected_cohort: int) -> float:
        """The z that scales the noise on the updates: z, or z_Δ (:func:`effective_noise_multiplier`) if adaptive."""
        if self.adaptive is None:
            return self.noise_multiplier
        return effective_noise_multiplier(self.noise_multiplier, self.adaptive.count_noise, expected_cohort)


def clip_updates(updates: np.ndarray, clip_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-update L2 clipping (McMahan et al., ICLR 2018, Alg. 1 ClipFn).

        Δ_i ← Δ_i · min(1, S / ‖Δ_i‖₂)

    Returns the clipped updates (n, d) and the mask b_i = 1[‖Δ_i‖₂ ≤ S] of updates left unchanged.
    """
    clipped = norm_clip(updates, clip_norm)
    return clipped, row_norms(updates) <= clip_norm


def central_dp_mean(
    updates: np.ndarray, clip_norm: float, noise_multiplier: float, expected_cohort: int, rng: np.random.Generator
) -> np.ndarray:
    """Central DP-FedAvg aggregate (McMahan et al., ICLR 2018, Alg. 1, fixed-denominator estimator f̃_f).

        Δ̃ = (Σ_i clip(Δ_i, S) + N(0, (z·S)² I)) / m

    Uniform weights and the expected cohort size m, not the realised count n, keep the
    sum's sensitivity at S, so the noise std on the mean is z·S/m per coordinate.
    """
    if not (expected_cohort >= 1 and noise_multiplier >= 0):
        raise AggregationError(
            f"central_dp_mean needs expected_cohort >= 1 and noise_multiplier >= 0, "
            f"got {expected_cohort} and {noise_multiplier}"
        )
    clipped, _ = clip_updates(updates, clip_norm)
    total = clipped.astype(np.float64).sum(axis=0)
    noisy = total + rng.normal(0.0, noise_multiplier * clip_norm, size=total.shape)
    return (noisy / expected_cohort).astype(clipped.dtype)


def local_dp(update: np.ndarray, clip_norm: float, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """The Gaussian mechanism on one sensor's clipped update, before it leaves the sensor (local DP).

        Δ̃ = clip(Δ, S) + N(0, (z·S)² I)      (clip as in McMahan et al., ICLR 2018, Alg. 1)

    The server picks the cohort and sees each Δ̃, so sampling does not amplify local
    privacy: a sensor's ε is :func:`epsilon` with q = 1 over the rounds it took part in.
    """
    update = np.asarray(update)
    if update.ndim != 1 or not noise_multiplier >= 0:
        raise AggregationError(
            f"local_dp needs one update of shape (d,) and noise_multiplier >= 0, got shape {update.shape} "
            f"and {noise_multiplier}"
        )
    clipped = norm_clip(update[None, :], clip_norm)[0]
    noisy = clipped.astype(np.float64) + rng.normal(0.0, noise_multiplier * clip_norm, size=clipped.shape)
    return noisy.astype(clipped.dtype)


def _count_noise(count_noise: float | None, expected_cohort: int) -> float:
    """σ_b: the configured value, or m/20, the setting of Andrew et al. (NeurIPS 2021) and TF Federated's default."""
    if expected_cohort < 1:
        raise ValueError(f"adaptive clipping needs an expected cohort m >= 1, got {expected_cohort}")
    return expected_cohort / 20 if count_noise is None else count_noise


def effective_noise_multiplier(noise_multiplier: float, count_noise: float | None, expected_cohort: int) -> float:
    """Noise multiplier z_Δ of the update sum under adaptive clipping (Andrew et al., NeurIPS 2021, Thm. 1).

    Each round releases two Gaussian queries: the clipped-update sum (sensitivity C,
    noise z_Δ·C) and the centred count Σ_i (b_i − ½) (sensitivity ½, noise σ_b, so
    noise multiplier 2σ_b). Together they are one Gaussian mechanism with

        z = (z_Δ^{-2} + (2σ_b)^{-2})^{-1/2},   so   z_Δ = (z^{-2} − (2σ_b)^{-2})^{-1/2}

    for the z the accountant charges. σ_b is in count units (the noise on b̃ is σ_b/m);
    ``count_noise`` None means σ_b = m/20. z = 0 gives 0. ValueError when 2σ_b ≤ z,
    where no z_Δ reaches the budget.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    count_std = _count_noise(count_noise, expected_cohort)
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_std > noise_multiplier:
        raise ValueError(
            f"count noise σ_b={count_std} is too small for noise multiplier z={noise_multiplier}: adaptive "
            f"clipping needs 2·σ_b > z (raise count_noise above {noise_multiplier / 2}, grow the cohort, or lower z)"
        )
    return (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5


class AdaptiveClip:
    """The clipping bound C of adaptive clipping (Andrew et al., NeurIPS 2021, Alg. 1, geometric update).

        b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / m + ½,   C ← C · exp(−η_C · (b̃ − γ))

    b_i = 1[‖Δ_i‖₂ ≤ C] over the n updates of the round. Centring the bits at ½, as the
    paper's analysis and TF Privacy do, gives the count sensitivity ½, which
    :func:`effective_noise_multiplier` relies on; when n = m, b̃ = (Σ_i b_i + N(0, σ_b²)) / m.
    """

    def __init__(self, config: AdaptiveClipping, clip_norm: float) -> None:
        if not clip_norm > 0:
            raise ValueError(f"adaptive clipping needs an initial clip_norm > 0, got {clip_norm}")
        self.config = config
        self.clip_norm = float(clip_norm)  # C, the bound for the next round

    def update(self, unclipped_count: int, num_updates: int, expected_cohort: int, rng: np.random.Generator) -> float:
        """Move C after a round where ``unclipped_count`` of ``num_updates`` updates had norm ≤ C; returns C."""
        if not 0 <= unclipped_count <= num_updates:
            raise ValueError(f"unclipped_count must lie in [0, num_updates={num_updates}], got {unclipped_count}")
        count_std = _count_noise(self.config.count_noise, expected_cohort)
        noisy_count = unclipped_count - num_updates / 2 + rng.normal(0.0, count_std)
        unclipped_fraction = noisy_count / expected_cohort + 0.5
        self.clip_norm *= math.exp(-self.config.clip_lr * (unclipped_fraction - self.config.target_quantile))
        return self.clip_norm


def _check_accounting(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> None:
    """ValueError unless 0 < q ≤ 1, z ≥ 0, T ≥ 0 and 0 < δ < 1."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate q = cohort / fleet must lie in (0, 1], got {sample_rate}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


@lru_cache(maxsize=256)
def _rdp_per_round(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP ε_α of one Poisson-subsampled Gaussian round at Opacus's default orders α (read-only)."""
    # Imported here: importing opacus loads its whole training stack (seconds), which loading a scenario should not pay.
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = np.asarray(
        compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS),
        dtype=np.float64,
    )
    rdp.setflags(write=False)
    return rdp


def _epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """(ε, δ) from RDP at Opacus's default orders (Balle et al., AISTATS 2020, Thm. 21); inf if every order is."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if np.isinf(rdp).all():
        return math.inf
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """ε at δ after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism (McMahan et al., ICLR 2018, Thm. 1).

        ε = min_α [ T·ε_α(q, z) + log((α−1)/α) − (log δ + log α)/(α−1) ]

    ε_α(q, z) is the RDP of one round with sampling rate q and noise multiplier z
    (Mironov, Talwar & Zhang 2019, arXiv:1908.10530), composed over T rounds by
    addition, and converted to (ε, δ) by Balle et al., AISTATS 2020, Thm. 21 — all
    computed by Opacus's RDP accountant at its default orders. z = 0 gives inf; T = 0 gives 0.
    """
    _check_accounting(sample_rate, noise_multiplier, steps, delta)
    if steps == 0:
        return 0.0
    return _epsilon_from_rdp(steps * _rdp_per_round(float(sample_rate), float(noise_multiplier)), delta)


class PrivacyLedger:
    """The privacy spent by a run so far, at a fixed δ.

        ε_α(run) = Σ_(q, z) T_(q, z) · ε_α(q, z),   then ε as in :func:`epsilon`

    RDP composes by addition, so each round costs one lookup of the cached per-round
    vector ε_α(q, z); rounds with different q or z (a changing cohort) add up too.
    """

    def __init__(self, delta: float) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {delta}")
        self.delta = delta
        self._rounds: dict[tuple[float, float], int] = {}

    @property
    def steps(self) -> int:
        """Rounds recorded so far."""
        return sum(self._rounds.values())

    @property
    def history(self) -> dict[tuple[float, float], int]:
        """Rounds recorded per (sample_rate, noise_multiplier); replaying them with :meth:`step` rebuilds the ledger."""
        return dict(self._rounds)

    def step(self, sample_rate: float, noise_multiplier: float, rounds: int = 1) -> float:
        """Record ``rounds`` rounds at sampling rate q and noise multiplier z; return ε spent so far."""
        _check_accounting(sample_rate, noise_multiplier, rounds, self.delta)
        key = (float(sample_rate), float(noise_multiplier))
        self._rounds[key] = self._rounds.get(key, 0) + rounds
        return self.epsilon()

    def epsilon(self) -> float:
        """ε spent so far at δ; 0 before any round."""
        return self._epsilon(self._rounds)

    def epsilon_after(self, sample_rate: float, noise_multiplier: float, rounds: int = 1) -> float:
        """ε the run would have spent after ``rounds`` more rounds at (q, z); nothing is recorded."""
        _check_accounting(sample_rate, noise_multiplier, rounds, self.delta)
        key = (float(sample_rate), float(noise_multiplier))
        return self._epsilon(self._rounds | {key: self._rounds.get(key, 0) + rounds})

    def exhausted(self, target_epsilon: float) -> bool:
        """Whether the ε spent has reached the budget ``target_epsilon``."""
        return self.epsilon() >= target_epsilon

    def _epsilon(self, rounds: dict[tuple[float, float], int]) -> float:
        spent = [count * _rdp_per_round(q, z) for (q, z), count in rounds.items() if count > 0]
        return _epsilon_from_rdp(sum(spent), self.delta) if spent else 0.0


class CentralDP:
    """The server side of central DP-FedAvg for one run: clip, sum, noise, divide by m; adaptive C.

    ``aggregate`` is the coordinator's combine step in DP mode. Sensor weights
    are ignored (uniform, as DP-FedAvg's sensitivity bound needs), and the
    noise multiplier on the sum is z, or z_Δ (:func:`effective_noise_multiplier`)
    when adaptive clipping also spends privacy on the unclipped count. With
    adaptive clipping, C moves after every aggregate from the same round's
    norms, so the next round clips at the new bound.
    """

    def __init__(self, config: Privacy, expected_cohort: int) -> None:
        if config.mode != "central":
            raise ValueError(f"CentralDP needs privacy mode central, got {config.mode}")
        self.config = config
        self.expected_cohort = int(expected_cohort)
        self.update_noise_multiplier = config.update_noise_multiplier(self.expected_cohort)
        self.adaptive = AdaptiveClip(config.adaptive, config.clip_norm) if config.adaptive is not None else None
        self._clip_norm = float(config.clip_norm)

    @property
    def clip_norm(self) -> float:
        """The bound the next aggregate clips to."""
        return self.adaptive.clip_norm if self.adaptive is not None else self._clip_norm

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the next aggregate: z_Δ·C/m."""
        return self.update_noise_multiplier * self.clip_norm / self.expected_cohort

    def aggregate(self, updates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(Σ_i clip(Δ_i, C) + N(0, (z_Δ·C)² I)) / m, then the adaptive step of C (noise drawn from ``rng``)."""
        bound = self.clip_norm
        mean = central_dp_mean(updates, bound, self.update_noise_multiplier, self.expected_cohort, rng)
        if self.adaptive is not None:
            unclipped = int((row_norms(updates) <= bound).sum())
            self.adaptive.update(unclipped, len(updates), self.expected_cohort, rng)
        return mean

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"clip_norm": np.float64(self.clip_norm)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        clip_norm = float(state["clip_norm"])
        if self.adaptive is not None:
            self.adaptive.clip_norm = clip_norm
        else:
            self._clip_norm = clip_norm


class RunAccountant:
    """Privacy spent by a run, charged as sensors release updates, with the budget check before each release.

    Central mode charges every round that samples a cohort with the sampling
    rate q of that round (sensors selected / sensors eligible) and noise
    multiplier z, through :class:`PrivacyLedger`. Local mode has no sampling
    amplification (the server sees each noisy update): a sensor's ε is
    :func:`epsilon` with q = 1 over its own releases, and the run reports the
    worst sensor's. Every selected sensor counts as released, whether or not
    its update was used: an upper bound, never an underestimate.
    """

    def __init__(self, config: Privacy, fleet_size: int) -> None:
        self.config = config
        self.ledger = PrivacyLedger(config.delta) if config.mode == "central" else None
        self.releases = np.zeros(fleet_size, dtype=np.int64) if config.mode == "local" else None
        self.spent = 0.0
        self.over_budget_at: int | None = None  # first step whose ε exceeded target_epsilon (on_budget warn)

    def epsilon_after(self, positions: np.ndarray, sample_rate: float) -> float:
        """ε the run would have spent once ``positions`` release an update at sampling rate ``sample_rate``."""
        z = self.config.noise_multiplier
        if self.ledger is not None:
            return self.ledger.epsilon_after(sample_rate, z)
        worst = int(self._with(positions).max(initial=0))
        return epsilon(1.0, z, worst, self.config.delta)

    def allows(self, positions: np.ndarray, sample_rate: float) -> bool:
        """Whether the budget lets these releases happen (always, without a target or with on_budget warn)."""
        target = self.config.target_epsilon
        if target is None or self.config.on_budget == "warn" or len(positions) == 0:
            return True
        return self.epsilon_after(positions, sample_rate) <= target

    def charge(self, positions: np.ndarray, sample_rate: float, step: int) -> float:
        """Record the releases of step ``step``; return ε spent so far."""
        if len(positions) == 0:
            return self.spent
        if self.ledger is not None:
            self.spent = self.ledger.step(sample_rate, self.config.noise_multiplier)
        else:
            self.releases = self._with(positions)
            self.spent = epsilon(1.0, self.config.noise_multiplier, int(self.releases.max()), self.config.delta)
        target = self.config.target_epsilon
        if target is not None and self.spent > target and self.over_budget_at is None:
            self.over_budget_at = step
        return self.spent

    def _with(self, positions: np.ndarray) -> np.ndarray:
        return self.releases + np.bincount(np.asarray(positions, dtype=np.int64), minlength=len(self.releases))

    def state_dict(self) -> dict[str, np.ndarray]:
        over = np.int64(-1 if self.over_budget_at is None else self.over_budget_at)
        if self.ledger is not None:
            history = self.ledger.history
            return {"rounds": np.array([[q, z, n] for (q, z), n in history.items()], dtype=np.float64).reshape(-1, 3),
                    "over_budget_at": over}
        return {"releases": self.releases.copy(), "over_budget_at": over}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore a :meth:`state_dict`: the central ledger is rebuilt by replaying its rounds."""
        if self.ledger is not None:
            self.ledger = PrivacyLedger(self.config.delta)
            for q, z, n in np.asarray(state["rounds"]).reshape(-1, 3).tolist():
                self.ledger.step(q, z, int(n))
            self.spent = self.ledger.epsilon()
        else:
            self.releases = np.array(state["releases"], dtype=np.int64)
            worst = int(self.releases.max(initial=0))
            self.spent = epsilon(1.0, self.config.noise_multiplier, worst, self.config.delta) if worst else 0.0
        over = int(state["over_budget_at"])
        self.over_budget_at = None if over < 0 else over

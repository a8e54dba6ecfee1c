"""Malicious sensor behaviours for robustness scenarios.

A share of the fleet, fixed for the whole run, is malicious. What a malicious
sensor sends in place of its honest update Δ_i:

    sign_flip   −scale·Δ_i                      (sign flipping; Damaskinos et al. 2018, Li et al. 2019 RSA)
    scale       scale·Δ_i                       (model replacement; Bagdasaryan et al., AISTATS 2020)
    gaussian    ξ ~ N(0, std²·I)                (Gaussian / random update; Blanchard et al., NeurIPS 2017)
    alie        μ + tau·σ of the honest updates (a little is enough; Baruch et al., NeurIPS 2019)
    nan         a vector of NaN or +inf         (corrupt payload; tests the validate/filter stage)
    label_flip  its honest update, trained on labels y → C − 1 − y
                                                (data poisoning; Tolpegin et al., ESORICS 2020)
    duplicate   its honest update, trained on copies of a few of its own samples: its first
                max(1, round(keep·n)) windows repeated to its n (low-quality data that still
                claims n samples)

Attacks act on the updates a round (or async step) delivers, before the
aggregator sees them; label flipping and duplication instead act on the
sensor's own data.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from raysim.streams import ATTACK, keyed_streams

# Second key of the per-sensor selection streams. Keeping it non-zero keeps them
# apart from the per-round noise streams stream(seed, ATTACK, round): NumPy's
# SeedSequence gives [.., r] and [.., r, 0] the same state.
_SELECTION = 0x5E1


class Attack(BaseModel):
    """The scenario's ``attack:`` section; fields the chosen kind does not use are ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["sign_flip", "gaussian", "scale", "alie", "label_flip", "duplicate", "nan"]
    # Share of the fleet that is malicious, rounded to the nearest whole sensor (halves up).
    fraction: float = Field(ge=0, lt=1)
    # sign_flip sends −scale·Δ; scale sends scale·Δ. Model replacement (Bagdasaryan et al.,
    # §3.2) boosts by γ = n/η so the update survives averaging: use the cohort size here.
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    std: float = Field(1.0, gt=0, allow_inf_nan=False)  # gaussian: σ of the noise sent
    tau: float = Field(1.0, allow_inf_nan=False)  # alie: z, standard deviations away from the mean
    value: Literal["nan", "inf"] = "nan"  # nan: what every coordinate is set to
    keep: float = Field(0.1, gt=0, le=1)  # duplicate: share of its samples that are distinct


def attacker_count(num_sensors: int, fraction: float) -> int:
    """round(fraction · num_sensors), halves rounded up so the count never falls as n grows."""
    return int(np.floor(fraction * num_sensors + 0.5))


def choose_attackers(seed: int, sensor_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask over ``sensor_ids``: exactly ``attacker_count(n, fraction)`` are malicious.

    Each sensor gets a key u ~ U[0, 1) from stream(seed, ATTACK, sensor_id, ·); the
    sensors with the smallest keys are malicious. So the choice depends only on the
    seed, the set of ids and the fraction, never on their order, and a larger
    fraction keeps every sensor a smaller one chose.
    """
    ids = np.asarray(sensor_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"sensor_ids must be 1-D, got shape {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("sensor_ids contains duplicates")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rows = np.stack([ids, np.full_like(ids, _SELECTION)], axis=1)
    keys = np.array([rng.random() for rng in keyed_streams(seed, ATTACK, rows)])
    order = np.lexsort((ids, keys))  # ties (never seen in practice) broken by id
    malicious = np.zeros(len(ids), dtype=bool)
    malicious[order[: attacker_count(len(ids), fraction)]] = True
    return malicious


def attack_updates(
    attack: Attack, updates: np.ndarray, malicious: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A new (n, d) array with the malicious rows replaced by what those sensors send.

    Honest rows are copied bit for bit and the dtype is kept. ``rng`` is
    stream(seed, ATTACK, round_or_step); only gaussian draws from it.

    alie sends μ + tau·σ to every malicious sensor, μ and σ being the coordinate-wise
    mean and sample standard deviation (ddof=1) of the honest rows; with one honest
    row σ = 0, and with none the attackers use their own true updates, as in the
    paper's non-omniscient setting.
    """
    updates = np.asarray(updates)
    malicious = np.asarray(malicious, dtype=bool)
    if updates.ndim != 2:
        raise ValueError(f"updates must be 2-D (n, d), got shape {updates.shape}")
    if malicious.shape != updates.shape[:1]:
        raise ValueError(f"malicious must have shape ({len(updates)},), got {malicious.shape}")
    if not np.issubdtype(updates.dtype, np.floating):
        raise ValueError(f"updates must be floating point, got {updates.dtype}")
    out = updates.copy()
    count = int(malicious.sum())
    if count == 0 or attack.kind in ("label_flip", "duplicate"):
        return out
    if attack.kind == "sign_flip":
        out[malicious] = -attack.scale * updates[malicious].astype(np.float64)
    elif attack.kind == "scale":
        out[malicious] = attack.scale * updates[malicious].astype(np.float64)
    elif attack.kind == "gaussian":
        out[malicious] = rng.normal(0.0, attack.std, size=(count, updates.shape[1]))
    elif attack.kind == "alie":
        reference = updates[~malicious] if count < len(updates) else updates
        reference = reference.astype(np.float64)
        std = reference.std(axis=0, ddof=1) if len(reference) >= 2 else 0.0
        out[malicious] = reference.mean(axis=0) + attack.tau * std
    else:
        out[malicious] = np.nan if attack.value == "nan" else np.inf
    return out


def flip_labels(y: np.ndarray, classes: int) -> np.ndarray:
    """Label flipping (Tolpegin et al., ESORICS 2020): y → classes − 1 − y, an involution on [0, classes)."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must be in [0, {classes}), got range [{y.min()}, {y.max()}]")
    return (classes - 1 - y).astype(y.dtype)

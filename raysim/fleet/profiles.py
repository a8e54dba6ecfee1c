"""Device and network profiles of the fleet, one column per property.

Profiles are columnar numpy arrays aligned by position (position i is the
i-th sensor in sorted id order), not one Python object per sensor, so a fleet
of a million sensors is a few dozen megabytes and slices cheaply into shards.

Each sensor draws its own speed and bandwidths from its tier, from its own
stream ``stream(seed, PROFILE, sensor_id)``, so a sensor's profile depends only
on the seed, its id and its tier, never on the fleet's size or order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from raysim.streams import PROFILE, keyed_streams

if TYPE_CHECKING:
    from raysim.scenario import Scenario, Tier

_TIER_STREAM = 201  # stream code of the tier assignment permutation

# Per-sensor columns drawn around the tier's median: column → the tier's σ for it.
# The order is the order of the draws from the sensor's stream; never reorder it.
_DRAWN_COLUMNS = {
    "seconds_per_sample": "speed_sigma",
    "up_mbps": "bandwidth_sigma",
    "down_mbps": "bandwidth_sigma",
}

# Per-sensor columns copied from the tier, with their dtypes.
_TIER_COLUMNS = {
    "jitter_sigma": np.float64,
    "latency_ms": np.float64,
    "loss": np.float64,
    "retransmit_timeout_s": np.float64,
    "max_retries": np.int32,
}


@dataclass(frozen=True, eq=False)
class FleetProfiles:
    """Every sensor's profile; all arrays have one entry per sensor, aligned by position."""

    sensor_id: np.ndarray  # int64
    tier: np.ndarray  # int16, index into tier_names / scenario.fleet.tiers
    num_samples: np.ndarray  # int64, training samples held by the sensor
    seconds_per_sample: np.ndarray  # float64, compute time of one sample in one local epoch (this sensor's draw)
    up_mbps: np.ndarray  # float64, this sensor's draw
    down_mbps: np.ndarray  # float64, this sensor's draw
    latency_ms: np.ndarray  # float64
    loss: np.ndarray  # float64, probability that one transfer attempt is lost
    retransmit_timeout_s: np.ndarray  # float64
    max_retries: np.ndarray  # int32
    # float64, σ of the per-task lognormal compute jitter (the clock draws it); omitted means no jitter
    jitter_sigma: np.ndarray | None = None
    tier_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.jitter_sigma is None:
            object.__setattr__(self, "jitter_sigma", np.zeros(len(self.sensor_id)))

    def __len__(self) -> int:
        return len(self.sensor_id)

    def take(self, indices: np.ndarray | Sequence[int]) -> "FleetProfiles":
        """The profiles at these positions (an index array or a boolean mask), in that order."""
        idx = np.asarray(indices)
        columns = {f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "tier_names"}
        return replace(self, **columns)

    def positions(self, sensor_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Positions of these sensor ids; :class:`KeyError` if one is not in the fleet."""
        ids = np.asarray(sensor_ids, dtype=np.int64)
        order = np.argsort(self.sensor_id, kind="stable")
        sorted_ids = self.sensor_id[order]
        where = np.searchsorted(sorted_ids, ids)
        where = np.minimum(where, len(sorted_ids) - 1) if len(sorted_ids) else where
        found = (sorted_ids[where] == ids) if len(sorted_ids) else np.zeros(len(ids), dtype=bool)
        if not np.all(found):
            raise KeyError(f"sensor ids not in the fleet: {ids[~found][:10].tolist()}")
        return order[where]


def tier_counts(shares: Sequence[float], sensors: int) -> np.ndarray:
    """Sensors per tier: share × sensors rounded by largest remainder (Hamilton), summing to ``sensors``.

    Ties in the remainder go to the earlier tier.
    """
    share = np.asarray(shares, dtype=np.float64)
    if sensors < 0 or len(share) == 0 or np.any(share < 0) or share.sum() <= 0:
        raise ValueError(f"cannot split {sensors} sensors by shares {list(shares)}")
    quota = share / share.sum() * sensors
    counts = np.floor(quota).astype(np.int64)
    remainder = quota - counts
    short = sensors - int(counts.sum())
    order = np.lexsort((np.arange(len(share)), -remainder))
    counts[order[:short]] += 1
    return counts


def assign_tiers(tiers: Sequence["Tier"], sensors: int, seed: int) -> np.ndarray:
    """Tier index (int16) of each of ``sensors`` positions.

    Exactly :func:`tier_counts` positions get each tier; which positions is a
    seeded permutation, so tiers are not correlated with sensor ids.
    """
    counts = tier_counts([t.share for t in tiers], sensors)
    labels = np.repeat(np.arange(len(tiers), dtype=np.int16), counts)
    return np.random.default_rng([int(seed), _TIER_STREAM]).permutation(labels)


def build_profiles(scenario: "Scenario", sensor_ids: np.ndarray, num_samples: np.ndarray,
                   tier_seconds: Sequence[float] | None = None) -> FleetProfiles:
    """Profiles of the fleet: each sensor draws its own values around its assigned tier's medians.

        seconds_per_sample = tier.seconds_per_sample · exp(speed_sigma · z₁)
        up_mbps            = tier.up_mbps            · exp(bandwidth_sigma · z₂)
        down_mbps          = tier.down_mbps          · exp(bandwidth_sigma · z₃)

    z₁, z₂, z₃ ~ N(0, 1) are the first three draws of ``stream(seed, PROFILE,
    sensor_id)``, always all three, so a σ of 0 leaves the tier's value exact
    and changing one tier's σ does not move any other sensor. The other
    columns are copied from the tier. ``sensor_ids`` and ``num_samples`` are
    aligned; positions follow them as given. ``tier_seconds`` gives each
    tier's median seconds_per_sample where tiers derive it from their models
    (``architectures.tier_seconds_per_sample``).
    """
    sensor_ids = np.asarray(sensor_ids, dtype=np.int64).reshape(-1)
    num_samples = np.asarray(num_samples, dtype=np.int64).reshape(-1)
    if len(sensor_ids) != len(num_samples):
        raise ValueError(f"{len(sensor_ids)} sensor ids but {len(num_samples)} sample counts")
    tiers = scenario.fleet.tiers
    tier = assign_tiers(tiers, len(sensor_ids), scenario.seed)
    z = np.empty((len(sensor_ids), len(_DRAWN_COLUMNS)))
    for row, rng in enumerate(keyed_streams(scenario.seed, PROFILE, sensor_ids[:, None])):
        z[row] = rng.standard_normal(len(_DRAWN_COLUMNS))
    columns = {}
    for k, (name, sigma_name) in enumerate(_DRAWN_COLUMNS.items()):
        given = tier_seconds if name == "seconds_per_sample" and tier_seconds is not None else [
            getattr(t, name) for t in tiers]
        median = np.array(given, dtype=np.float64)[tier]
        sigma = np.array([getattr(t, sigma_name) for t in tiers], dtype=np.float64)[tier]
        columns[name] = median * np.exp(sigma * z[:, k])
    for name, dtype in _TIER_COLUMNS.items():
        columns[name] = np.array([getattr(t, name) for t in tiers], dtype=dtype)[tier]
    return FleetProfiles(
        sensor_id=sensor_ids,
        tier=tier,
        num_samples=num_samples,
        tier_names=tuple(t.name for t in tiers),
        **columns,
    )

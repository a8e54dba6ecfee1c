"""Sensor data that drifts over rounds: calibration random walks and sudden sensor faults.

With ``drift:`` in the scenario, the windows a sensor trains on in round r
are its own windows transformed (the held-out test set, from unseen sensors,
is not):

    x' = exp(G_i(r)) ⊙ x + O_i(r),   G_i(r) = Σ_{k≤r} gain_walk · z_k,   O_i(r) = Σ_{k≤r} offset_walk · z'_k

per channel, z, z' ~ N(0, 1) drawn from the sensor's own stream, so gain and
offset wander as random walks whose variance grows linearly with the round.
A seeded ``fault.fraction`` of the sensors fails at ``fault.round``: from then
on a ``stuck`` sensor outputs a constant per channel (the first value of its
first window), and a ``noisy`` one adds N(0, noise²) to every value. Pure
numpy; the draws depend only on (seed, sensor, round).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raysim.attacks import attacker_count
from raysim.streams import DRIFT, keyed_streams, stream

if TYPE_CHECKING:
    from raysim.scenario import Drift

_FAULTY = 0xFA17  # second key of the fault-selection streams


def faulty_sensors(seed: int, sensor_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask over ``sensor_ids``: the round(fraction·n) sensors with the smallest seeded keys fail."""
    ids = np.asarray(sensor_ids, dtype=np.int64)
    keys = np.array([rng.random() for rng in keyed_streams(seed, DRIFT, np.stack([ids, np.full(len(ids), _FAULTY)], 1))])
    mask = np.zeros(len(ids), dtype=bool)
    mask[np.argsort(keys, kind="stable")[: attacker_count(len(ids), fraction)]] = True
    return mask


class SensorDrift:
    """The scenario's drift for the sensors of one client actor."""

    def __init__(self, config: "Drift", seed: int, fleet_ids: np.ndarray, channels: int) -> None:
        self.config, self.seed, self.channels = config, seed, channels
        self.faulty = set(np.asarray(fleet_ids)[faulty_sensors(seed, fleet_ids, config.fault.fraction)].tolist()) \
            if config.fault is not None else set()

    def walks(self, sensor_id: int, round_index: int) -> tuple[np.ndarray, np.ndarray]:
        """G_i(r) and O_i(r), each (channels,)."""
        rng = stream(self.seed, DRIFT, int(sensor_id))
        z = rng.standard_normal((max(round_index, 0), 2, self.channels))
        return self.config.gain_walk * z[:, 0].sum(0), self.config.offset_walk * z[:, 1].sum(0)

    def apply(self, sensor_id: int, round_index: int, x: np.ndarray) -> np.ndarray:
        """Sensor ``sensor_id``'s windows ``x`` (n, C, T) as it records them in round ``round_index``."""
        gain, offset = self.walks(sensor_id, round_index)
        out = np.exp(gain)[None, :, None] * x + offset[None, :, None]
        fault = self.config.fault
        if fault is not None and sensor_id in self.faulty and round_index >= fault.round:
            if fault.kind == "stuck":
                out = np.broadcast_to(out[:1, :, :1], out.shape).copy()
            else:
                noise = stream(self.seed, DRIFT, int(sensor_id), int(round_index)).standard_normal(out.shape)
                out = out + fault.noise * noise
        return out.astype(np.float32)

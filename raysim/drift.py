"""Sensor data that drifts over rounds: calibration random walks and sudden sensor faults.

With ``drift:`` in the scenario, the windows a sensor trains on in round r
are its own windows transformed (the held-out test set, from unseen sensors,
is not):

    x' = exp(G_i(r)) ⊙ x + O_i(r),   G_i(r) = Σ_{k≤r} gain_walk · z_k,   O_i(r) = Σ_{k≤r} offset_walk · z'_k

per channel, z, z' ~ N(0, 1) drawn from the sensor's own stream, so gain and
offset wander as random walks whose variance grows linearly with the round.
With ``prior_walk`` the sensor's class mix drifts too: each class c gets a
log-weight random walk H_c(r) (steps of σ = prior_walk), and the round's
windows are its own resampled with replacement with probability ∝ exp(H_y(r)).
A seeded ``fault.fraction`` of the sensors fails at ``fault.round``: from then
on a ``stuck`` sensor outputs a constant per channel (the first value of its
first window), and a ``noisy`` one adds N(0, noise²) to every value. The
draws depend only on (seed, sensor, round).

Detection (``drift.detection``): with each update a sensor reports ``samples``
values per channel, drawn at random (its own stream) from the windows it
trained on. The coordinator keeps each sensor's first report as its
reference and tests every later one against it, per channel, with a
two-sample Kolmogorov–Smirnov test; the sensor is flagged when the smallest
p-value is below alpha / C (Bonferroni over the C channels), so a stationary
sensor raises a false alarm in at most a share alpha of its tests. A sudden
fault is caught at the sensor's first participation after it: with a cohort
of k sensors in a fleet of N, on average N / k rounds later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from scipy.stats import ks_2samp

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

    def class_weights(self, sensor_id: int, round_index: int, classes: int) -> np.ndarray:
        """exp(H_c(r)) for each class c: the class-prior random walk's weights."""
        rng = stream(self.seed, DRIFT, int(sensor_id), _PRIOR)
        z = rng.standard_normal((max(round_index, 0), classes))
        return np.exp(self.config.prior_walk * z.sum(0))

    def resample(self, sensor_id: int, round_index: int, x: np.ndarray, y: np.ndarray,
                 classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The sensor's windows drawn again, with replacement, with its drifted class prior (``prior_walk``)."""
        if not self.config.prior_walk or len(y) == 0:
            return x, y
        weight = self.class_weights(sensor_id, round_index, classes)[y]
        rng = stream(self.seed, DRIFT, int(sensor_id), int(round_index), _PRIOR)
        rows = rng.choice(len(y), size=len(y), p=weight / weight.sum())
        return x[rows], y[rows]

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

    def report(self, sensor_id: int, round_index: int, x: np.ndarray, samples: int) -> np.ndarray:
        """The summary a sensor sends with its update: ``samples`` random values of each channel of the windows
        ``x`` (n, C, T) it trained on, flattened (C·samples,)."""
        rng = stream(self.seed, DRIFT, int(sensor_id), int(round_index), _REPORT)
        rows = rng.integers(len(x), size=samples)
        times = rng.integers(x.shape[2], size=samples)
        return x[rows, :, times].T.reshape(-1).astype(np.float32)


_REPORT = 0x5E7  # last key of the report-sampling streams
_PRIOR = 0x9C1  # key of the class-prior walk and resampling streams

# drift.parquet: one row per KS test (a sensor's report after its first).
DRIFT_SCHEMA = pa.schema([("round", pa.int64()), ("sensor", pa.int64()), ("statistic", pa.float64()),
                          ("p_value", pa.float64()), ("alarm", pa.bool_())])


class DriftDetector:
    """The coordinator's side: each sensor's reference report, and a KS test of every later one."""

    def __init__(self, alpha: float, channels: int) -> None:
        self.alpha, self.channels = alpha, channels
        self.reference: dict[int, np.ndarray] = {}  # sensor id → its first report (C, samples)
        self.rows: list[dict] = []  # drift.parquet: round, sensor, statistic, p_value, alarm

    def observe(self, round_index: int, sensor_ids: np.ndarray, reports: np.ndarray) -> int:
        """Test this round's reports; returns how many sensors were flagged."""
        alarms = 0
        for sid, report in zip(sensor_ids.tolist(), reports):
            values = np.asarray(report, dtype=np.float64).reshape(self.channels, -1)
            first = self.reference.get(int(sid))
            if first is None:
                self.reference[int(sid)] = values
                continue
            tests = [ks_2samp(first[c], values[c], method="asymp") for c in range(self.channels)]
            p_value = min(t.pvalue for t in tests)
            alarm = bool(p_value < self.alpha / self.channels)
            alarms += alarm
            self.rows.append({"round": int(round_index), "sensor": int(sid), "statistic": max(t.statistic for t in tests),
                              "p_value": float(p_value), "alarm": alarm})
        return alarms

    def state_dict(self) -> dict[str, np.ndarray]:
        ids = np.array(sorted(self.reference), dtype=np.int64)
        refs = (np.stack([self.reference[i] for i in ids.tolist()]) if len(ids)
                else np.zeros((0, self.channels, 0)))
        return {"ids": ids, "reference": refs}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.reference = {int(i): np.asarray(r) for i, r in zip(state["ids"], state["reference"])}

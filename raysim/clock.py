"""The virtual clock: how long each sensor task takes, in simulated seconds.

Nothing sleeps. For a sensor dispatched at virtual time t with a model of
``bytes_down`` bytes and an encoded update of ``bytes_up`` bytes:

    download = latency + 8·bytes_down / (down_mbps·10⁶)
    compute  = num_samples × epochs × seconds_per_sample
    upload   = latency + 8·bytes_up / (up_mbps·10⁶)

Each transfer attempt is lost with probability ``loss``; a lost attempt costs
its full transfer time plus ``retransmit_timeout_s`` before the retry, and
after ``max_retries`` retries the task is lost. Every draw comes from a stream
keyed by (seed, sensor id, round), so timings do not depend on how sensors are
spread over client actors. Pure numpy: no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.fleet.profiles import FleetProfiles
from raysim.streams import CLOCK, stream

APPLIED, LOST = "applied", "lost"


@dataclass(frozen=True)
class TaskPlan:
    """Timing of one batch of sensor tasks, columnar and aligned with the sensors given."""

    dispatched_at: np.ndarray  # virtual seconds
    download_s: np.ndarray  # time spent downloading, retries included
    compute_s: np.ndarray  # 0 for tasks that never receive the model
    upload_s: np.ndarray
    arrived_at: np.ndarray  # when the update reached the coordinator, or when the task was given up
    down_attempts: np.ndarray
    up_attempts: np.ndarray
    delivered: np.ndarray  # bool: the update reaches the coordinator

    @property
    def outcome(self) -> np.ndarray:
        return np.where(self.delivered, APPLIED, LOST)


def transfer_seconds(num_bytes: float, mbps: np.ndarray, latency_ms: np.ndarray) -> np.ndarray:
    """One attempt's transfer time: latency + 8·bytes / (mbps·10⁶)."""
    return latency_ms / 1e3 + 8.0 * num_bytes / (mbps * 1e6)


def _attempts(rng: np.random.Generator, loss: float, max_retries: int) -> int:
    """Attempts a transfer takes (1 = first try succeeds); max_retries + 2 means it never succeeded."""
    if loss <= 0:
        return 1
    failures = int(rng.geometric(1.0 - loss)) - 1  # lost attempts before the first success
    return min(failures, max_retries + 1) + 1


def plan_tasks(
    profiles: FleetProfiles,
    *,
    seed: int,
    round_index: int,
    dispatched_at: float,
    bytes_down: int,
    bytes_up: int,
    epochs: int,
) -> TaskPlan:
    """Decide, before any training, when each sensor's update arrives and whether it is lost."""
    count = len(profiles)
    max_tries = profiles.max_retries.astype(np.int64) + 1
    down_attempts = np.empty(count, dtype=np.int64)
    up_attempts = np.empty(count, dtype=np.int64)
    for i in range(count):
        rng = stream(seed, CLOCK, int(profiles.sensor_id[i]), round_index)
        down_attempts[i] = _attempts(rng, float(profiles.loss[i]), int(profiles.max_retries[i]))
        up_attempts[i] = _attempts(rng, float(profiles.loss[i]), int(profiles.max_retries[i]))
    got_model = down_attempts <= max_tries
    down_attempts = np.minimum(down_attempts, max_tries)
    delivered = got_model & (up_attempts <= max_tries)
    up_attempts = np.where(got_model, np.minimum(up_attempts, max_tries), 0)

    one_down = transfer_seconds(bytes_down, profiles.down_mbps, profiles.latency_ms)
    one_up = transfer_seconds(bytes_up, profiles.up_mbps, profiles.latency_ms)
    rto = profiles.retransmit_timeout_s
    download_s = _with_retries(one_down, rto, down_attempts, got_model)
    compute_s = np.where(got_model, profiles.num_samples * epochs * profiles.seconds_per_sample, 0.0)
    upload_s = np.where(got_model, _with_retries(one_up, rto, up_attempts, delivered), 0.0)
    start = np.full(count, float(dispatched_at))
    return TaskPlan(
        dispatched_at=start,
        download_s=download_s,
        compute_s=compute_s,
        upload_s=upload_s,
        arrived_at=start + download_s + compute_s + upload_s,
        down_attempts=down_attempts,
        up_attempts=up_attempts,
        delivered=delivered,
    )


def _with_retries(one: np.ndarray, rto: np.ndarray, attempts: np.ndarray, succeeded: np.ndarray) -> np.ndarray:
    """Failed attempts cost transfer + timeout each; the successful one costs one transfer."""
    failed = np.where(succeeded, attempts - 1, attempts)
    return failed * (one + rto) + np.where(succeeded, one, 0.0)

"""The virtual clock: how long each sensor task takes, in simulated seconds.

Nothing sleeps. For a sensor dispatched at virtual time t with a model of
``bytes_down`` bytes and an encoded update of ``bytes_up`` bytes:

    download = latency + 8·bytes_down / (down_mbps·10⁶)
    compute  = num_samples × epochs × seconds_per_sample × exp(jitter_sigma·z),  z ~ N(0, 1) per task
    upload   = latency + 8·bytes_up / (up_mbps·10⁶)

Each transfer attempt is lost with probability ``loss``; a lost attempt costs
its full transfer time plus ``retransmit_timeout_s`` before the retry, and
after ``max_retries`` retries the task is lost. A sensor that goes offline
between dispatch and arrival drops the task at that moment. Every draw comes
from a stream keyed by (seed, sensor id, task key) — the round in sync mode,
the task number in async mode — so timings never depend on how sensors are
spread over client actors. Pure numpy: no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raysim.fleet.profiles import FleetProfiles
from raysim.streams import CLOCK, stream

if TYPE_CHECKING:
    from raysim.availability import Availability

APPLIED, LATE, LOST, OFFLINE = "applied", "late", "lost", "offline"


@dataclass(frozen=True)
class TaskPlan:
    """Timing of a batch of sensor tasks, columnar and aligned with the sensors given."""

    dispatched_at: np.ndarray  # virtual seconds
    download_s: np.ndarray  # time spent downloading, retries included
    compute_s: np.ndarray  # 0 for tasks that never receive the model
    upload_s: np.ndarray
    arrived_at: np.ndarray  # when the update reached the coordinator, or when the task was given up
    down_attempts: np.ndarray
    up_attempts: np.ndarray
    outcome: np.ndarray  # APPLIED (delivered), LOST or OFFLINE; straggler policies may mark LATE

    @property
    def delivered(self) -> np.ndarray:
        return self.outcome == APPLIED

    @property
    def received_model(self) -> np.ndarray:
        """Tasks whose sensor got the model and would have computed (trained or not)."""
        return self.compute_s > 0

    @property
    def retransmissions(self) -> np.ndarray:
        return np.maximum(self.down_attempts - 1, 0) + np.maximum(self.up_attempts - 1, 0)

    @property
    def duration_s(self) -> np.ndarray:
        return self.arrived_at - self.dispatched_at


def transfer_seconds(num_bytes: float | np.ndarray, mbps: np.ndarray, latency_ms: np.ndarray) -> np.ndarray:
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
    task_keys: int | np.ndarray,
    dispatched_at: float | np.ndarray,
    bytes_down: int | np.ndarray,
    bytes_up: int | np.ndarray,
    epochs: int,
    availability: "Availability | None" = None,
    positions: np.ndarray | None = None,
) -> TaskPlan:
    """Decide, before any training, when each task's update arrives, or how and when it is dropped.

    ``profiles`` are the tasks' sensors (one row per task); ``positions`` are
    their positions in the fleet, needed only to ask ``availability``.
    """
    count = len(profiles)
    keys = np.broadcast_to(np.asarray(task_keys, dtype=np.int64), (count,))
    start = np.broadcast_to(np.asarray(dispatched_at, dtype=np.float64), (count,)).copy()
    max_tries = profiles.max_retries.astype(np.int64) + 1
    down_attempts = np.empty(count, dtype=np.int64)
    up_attempts = np.empty(count, dtype=np.int64)
    jitter = np.ones(count)
    for i in range(count):
        rng = stream(seed, CLOCK, int(profiles.sensor_id[i]), int(keys[i]))
        down_attempts[i] = _attempts(rng, float(profiles.loss[i]), int(profiles.max_retries[i]))
        up_attempts[i] = _attempts(rng, float(profiles.loss[i]), int(profiles.max_retries[i]))
        if profiles.jitter_sigma[i] > 0:
            jitter[i] = np.exp(profiles.jitter_sigma[i] * rng.standard_normal())
    got_model = down_attempts <= max_tries
    down_attempts = np.minimum(down_attempts, max_tries)
    delivered = got_model & (up_attempts <= max_tries)
    up_attempts = np.where(got_model, np.minimum(up_attempts, max_tries), 0)

    one_down = transfer_seconds(bytes_down, profiles.down_mbps, profiles.latency_ms)
    one_up = transfer_seconds(bytes_up, profiles.up_mbps, profiles.latency_ms)
    rto = profiles.retransmit_timeout_s
    download_s = _with_retries(one_down, rto, down_attempts, got_model)
    compute_s = np.where(got_model, profiles.num_samples * epochs * profiles.seconds_per_sample * jitter, 0.0)
    upload_s = np.where(got_model, _with_retries(one_up, rto, up_attempts, delivered), 0.0)
    arrived_at = start + download_s + compute_s + upload_s
    outcome = np.where(delivered, APPLIED, LOST).astype(object)

    if availability is not None:
        if positions is None:
            raise ValueError("plan_tasks needs the tasks' fleet positions to ask availability")
        gone = availability.first_offline(positions, start, arrived_at)
        offline = np.isfinite(gone)
        outcome[offline] = OFFLINE
        # The task ends when the sensor drops; the phases are cut at that moment.
        download_s, compute_s, upload_s = _cut(gone - start, offline, download_s, compute_s, upload_s)
        arrived_at = np.where(offline, gone, arrived_at)
        up_attempts = np.where(offline & (upload_s == 0), 0, up_attempts)
    return TaskPlan(
        dispatched_at=start,
        download_s=download_s,
        compute_s=compute_s,
        upload_s=upload_s,
        arrived_at=arrived_at,
        down_attempts=down_attempts,
        up_attempts=up_attempts,
        outcome=outcome.astype(str),
    )


def _with_retries(one: np.ndarray, rto: np.ndarray, attempts: np.ndarray, succeeded: np.ndarray) -> np.ndarray:
    """Failed attempts cost transfer + timeout each; the successful one costs one transfer."""
    failed = np.where(succeeded, attempts - 1, attempts)
    return failed * (one + rto) + np.where(succeeded, one, 0.0)


def _cut(elapsed: np.ndarray, cut: np.ndarray, *phases: np.ndarray) -> list[np.ndarray]:
    """Truncate consecutive phases so that, where ``cut``, they add up to ``elapsed``."""
    remaining = np.where(cut, elapsed, np.inf)
    out = []
    for phase in phases:
        kept = np.minimum(phase, np.maximum(remaining, 0.0))
        out.append(np.where(cut, kept, phase))
        remaining = remaining - phase
    return out

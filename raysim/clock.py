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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from raysim.fleet.profiles import FleetProfiles
from raysim.streams import CLOCK, keyed_streams, stream

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


class TaskTiming(NamedTuple):
    """One task's row of a :class:`TaskPlan`, as plain scalars."""

    dispatched_at: float
    download_s: float
    compute_s: float
    upload_s: float
    arrived_at: float
    down_attempts: int
    up_attempts: int
    outcome: str


def stack_timings(rows: Sequence[TaskTiming]) -> TaskPlan:
    """The plan whose rows these are, in this order."""
    columns = list(zip(*rows)) if rows else [()] * len(TaskTiming._fields)
    types = (float, float, float, float, float, np.int64, np.int64, str)
    return TaskPlan(**{name: np.array(column, dtype=kind) for name, column, kind in
                       zip(TaskTiming._fields, columns, types)})


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
    if availability is not None and positions is None:
        raise ValueError("plan_tasks needs the tasks' fleet positions to ask availability")
    keys = np.broadcast_to(np.asarray(task_keys, dtype=np.int64), (count,)).tolist()
    start = np.broadcast_to(np.asarray(dispatched_at, dtype=np.float64), (count,)).tolist()
    down = np.broadcast_to(np.asarray(bytes_down), (count,)).tolist()
    up = np.broadcast_to(np.asarray(bytes_up), (count,)).tolist()
    key_rows = np.stack([profiles.sensor_id.astype(np.int64), np.asarray(keys, dtype=np.int64)], axis=1)
    rngs = keyed_streams(seed, CLOCK, key_rows.reshape(count, 2))  # = stream(seed, CLOCK, sensor, key), seeded in bulk
    rows = [_timing(profiles, i, rng, start[i], down[i], up[i], epochs) for i, rng in zip(range(count), rngs)]
    if availability is not None:
        gone = availability.first_offline(positions, start, [row.arrived_at for row in rows])
        for i in np.flatnonzero(np.isfinite(gone)):
            rows[i] = _cut_offline(rows[i], float(gone[i]))
    return stack_timings(rows)


def plan_task(
    profiles: FleetProfiles,
    position: int,
    *,
    seed: int,
    task_key: int,
    dispatched_at: float,
    bytes_down: int,
    bytes_up: int,
    epochs: int,
    availability: "Availability | None" = None,
) -> TaskTiming:
    """:func:`plan_tasks` for one task of the sensor at fleet ``position``, with plain scalars (the async loop's path)."""
    rng = stream(seed, CLOCK, int(profiles.sensor_id[position]), task_key)
    row = _timing(profiles, position, rng, dispatched_at, bytes_down, bytes_up, epochs)
    if availability is not None:
        gone = availability.offline_within(position, dispatched_at, row.arrived_at)
        if math.isfinite(gone):
            row = _cut_offline(row, gone)
    return row


def _timing(profiles: FleetProfiles, i: int, rng: np.random.Generator, start: float, bytes_down: float,
            bytes_up: float, epochs: int) -> TaskTiming:
    """Row ``i``'s task, ignoring availability: its losses and jitter drawn from ``rng`` (the task's
    stream(seed, CLOCK, sensor, key)), then the formulas above."""
    loss, retries = float(profiles.loss[i]), int(profiles.max_retries[i])
    down_attempts = _attempts(rng, loss, retries)
    up_attempts = _attempts(rng, loss, retries)
    sigma = float(profiles.jitter_sigma[i])
    jitter = math.exp(sigma * rng.standard_normal()) if sigma > 0 else 1.0
    tries = retries + 1
    latency_ms, rto = float(profiles.latency_ms[i]), float(profiles.retransmit_timeout_s[i])
    one_down = transfer_seconds(bytes_down, float(profiles.down_mbps[i]), latency_ms)
    if down_attempts > tries:  # every download attempt lost: the model never arrives
        download_s = tries * (one_down + rto)
        return TaskTiming(start, download_s, 0.0, 0.0, start + download_s, tries, 0, LOST)
    download_s = (down_attempts - 1) * (one_down + rto) + one_down
    compute_s = int(profiles.num_samples[i]) * epochs * float(profiles.seconds_per_sample[i]) * jitter
    one_up = transfer_seconds(bytes_up, float(profiles.up_mbps[i]), latency_ms)
    if up_attempts > tries:
        upload_s, up_attempts, outcome = tries * (one_up + rto), tries, LOST
    else:
        upload_s, outcome = (up_attempts - 1) * (one_up + rto) + one_up, APPLIED
    return TaskTiming(start, download_s, compute_s, upload_s, start + download_s + compute_s + upload_s,
                      down_attempts, up_attempts, outcome)


def _cut_offline(row: TaskTiming, gone: float) -> TaskTiming:
    """The sensor drops at ``gone``: the task ends then, its phases cut at that moment."""
    remaining = gone - row.dispatched_at
    phases = []
    for phase in (row.download_s, row.compute_s, row.upload_s):
        phases.append(min(phase, max(remaining, 0.0)))
        remaining -= phase
    download_s, compute_s, upload_s = phases
    up_attempts = row.up_attempts if upload_s > 0 else 0
    return row._replace(download_s=download_s, compute_s=compute_s, upload_s=upload_s, arrived_at=gone,
                        up_attempts=up_attempts, outcome=OFFLINE)

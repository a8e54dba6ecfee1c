"""When sensors are online, in virtual time: always, an on/off process, or a trace file.

Each tier of the scenario says how its sensors come and go
(``fleet.tiers[i].availability``):

- ``always``: online whenever asked.
- ``onoff``: an alternating renewal process with exponential on and off
  durations of means ``mean_on_s`` and ``mean_off_s``. A sensor starts on with
  the stationary probability mean_on_s / (mean_on_s + mean_off_s), and its first
  duration is a fresh exponential draw, which is exact because the exponential
  is memoryless: the process is stationary from time 0.
- ``trace``: online intervals [start_s, end_s) read from a CSV or Parquet file
  with columns ``sensor``, ``start_s`` and ``end_s``; optionally repeating every
  ``period_s``. Sensors of the tier that the file does not mention are always
  online.

The on/off process is generated lazily, in blocks of ``PAIRS_PER_BLOCK`` on/off
pairs per sensor, block b from ``stream(seed, AVAILABILITY, sensor_id, b)`` (the
initial state is the first draw of block 0). A block is drawn only when a query
reaches past what a sensor has generated, so an answer is a pure function of
(seed, sensor id, time) — never of which other sensors were asked, or in what
order — and sensors that are never asked cost nothing.

Every query is vectorized over an array of fleet positions. Intervals are
half-open: a sensor online over [a, b) is offline at b. Pure numpy: no Ray here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysim.errors import DataError
from raysim.fleet.profiles import FleetProfiles
from raysim.streams import AVAILABILITY, keyed_streams

if TYPE_CHECKING:
    from raysim.scenario import Scenario

PAIRS_PER_BLOCK = 32  # on/off pairs drawn per sensor per block; part of the seeded process, never change it
_STEPS = 2 * PAIRS_PER_BLOCK  # state changes per block; even, so every block starts in the initial state
_ALWAYS, _ONOFF, _TRACE = 0, 1, 2
_TRACE_COLUMNS = "columns 'sensor' (integer sensor id), 'start_s' and 'end_s' (online interval in virtual seconds)"


class Availability:
    """Whether each sensor of the fleet is online at a virtual time.

    Build it with :meth:`from_scenario`. Queries take fleet positions (indices
    into the :class:`FleetProfiles` it was built from). It pickles, with only
    what the queries so far have generated.
    """

    def __init__(
        self,
        *,
        seed: int,
        sensor_id: np.ndarray,
        kind: np.ndarray,
        group: np.ndarray,
        onoff_means: np.ndarray,
        periods: np.ndarray,
        trace_lo: np.ndarray,
        trace_len: np.ndarray,
        trace_start: np.ndarray,
        trace_end: np.ndarray,
        trace_off: np.ndarray,
    ) -> None:
        """Prefer :meth:`from_scenario`; this takes the finished columnar tables.

        ``kind`` (per position) is always / on-off / trace; ``group`` indexes
        ``onoff_means`` ((mean_on_s, mean_off_s) rows) for on/off sensors and
        ``periods`` (inf = no repeat) for trace sensors. A trace sensor's merged
        intervals are ``trace_start``/``trace_end`` at [trace_lo, trace_lo +
        trace_len), sorted; ``trace_off`` is when the sensor goes offline once in
        that interval, relative to the cycle (past ``period`` when the interval
        runs into the next cycle's first one).
        """
        self._seed = int(seed)
        self._sensor_id = sensor_id
        self._kind = kind
        self._group = group
        self._onoff_means = onoff_means
        self._periods = periods
        self._trace_lo, self._trace_len = trace_lo, trace_len
        self._trace_start, self._trace_end, self._trace_off = trace_start, trace_end, trace_off
        # On/off state changes, generated on demand: position p's are _bounds[_on_lo[p] : _on_lo[p] + _on_len[p]],
        # in a slot of _on_cap[p] entries so that most extensions write in place.
        self._on_lo = np.zeros(len(sensor_id), dtype=np.int64)
        self._on_len = np.zeros(len(sensor_id), dtype=np.int64)
        self._on_cap = np.zeros(len(sensor_id), dtype=np.int64)
        self._on_first = np.zeros(len(sensor_id), dtype=bool)  # initial state; valid once _on_len > 0
        self._bounds = np.empty(0, dtype=np.float64)
        self._used = 0  # entries of _bounds handed out to slots, live or abandoned
        self._garbage = 0  # entries of abandoned slots (a sensor's old slot after it moved to a bigger one)

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_scenario(cls, scenario: "Scenario", profiles: FleetProfiles) -> "Availability":
        """Each sensor gets its tier's availability; trace files are read and validated here.

        Raises :class:`DataError` naming the file, the row or column and what
        was expected if a trace file is missing, unreadable or invalid. Every
        row is validated, also rows for sensor ids outside the fleet (or the
        tier), which are otherwise ignored.
        """
        tiers = scenario.fleet.tiers
        count = len(profiles)
        kind = np.full(count, _ALWAYS, dtype=np.int8)
        group = np.zeros(count, dtype=np.int32)
        onoff_means: list[tuple[float, float]] = []
        periods: list[float] = []
        traces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        loaded: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for index, tier in enumerate(tiers):
            config = tier.availability
            mine = np.flatnonzero(profiles.tier == index)
            if config.kind == "onoff":
                kind[mine] = _ONOFF
                group[mine] = len(onoff_means)
                onoff_means.append((float(config.mean_on_s), float(config.mean_off_s)))
            elif config.kind == "trace":
                path = scenario.resolve_path(config.path)
                if path not in loaded:
                    loaded[path] = _read_trace(path)
                period = math.inf if config.period_s is None else float(config.period_s)
                sensor, start, end = loaded[path]
                if math.isfinite(period):
                    _check_within_period(path, sensor, start, end, period)
                positions, start, end, off = _tier_intervals(mine, profiles.sensor_id[mine], sensor, start, end, period)
                kind[np.unique(positions)] = _TRACE
                group[mine] = len(periods)
                periods.append(period)
                traces.append((positions, start, end, off))
        positions, start, end, off = (
            (np.concatenate(parts) for parts in zip(*traces))
            if traces
            else (np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0))
        )
        order = np.lexsort((start, positions))
        trace_len = np.bincount(positions, minlength=count).astype(np.int64)
        trace_lo = np.concatenate(([0], np.cumsum(trace_len)[:-1])).astype(np.int64) if count else trace_len
        return cls(
            seed=scenario.seed,
            sensor_id=np.asarray(profiles.sensor_id, dtype=np.int64).copy(),
            kind=kind,
            group=group,
            onoff_means=np.array(onoff_means, dtype=np.float64).reshape(-1, 2),
            periods=np.array(periods, dtype=np.float64),
            trace_lo=trace_lo,
            trace_len=trace_len,
            trace_start=start[order],
            trace_end=end[order],
            trace_off=off[order],
        )

    def __len__(self) -> int:
        return len(self._sensor_id)

    # ----------------------------------------------------------------------- queries

    def online_at(self, positions: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """Whether each sensor is online at time ``t`` (a scalar, or one time per position)."""
        positions, t = self._arguments(positions, t)
        online = np.ones(len(positions), dtype=bool)
        for which, p in self._by_kind(positions, _TRACE):
            online[which] = self._trace_state(p, t[which])[0]
        for which, p in self._by_kind(positions, _ONOFF):
            online[which] = self._onoff_state(p, t[which])[0]
        return online

    def first_offline(self, positions: np.ndarray, start: float | np.ndarray, end: float | np.ndarray) -> np.ndarray:
        """The first time in [start, end] at which each sensor is offline; +inf if it stays online throughout.

        A sensor offline at ``start`` gives ``start``. ``end`` may be +inf.
        """
        positions, start = self._arguments(positions, start)
        end = np.broadcast_to(np.asarray(end, dtype=np.float64), positions.shape)
        if np.any(np.isnan(end)) or np.any(end < start):
            raise ValueError("first_offline needs end ≥ start for every sensor")
        offline_at = np.full(len(positions), np.inf)
        for which, p in self._by_kind(positions, _TRACE):
            online, went_off = self._trace_state(p, start[which])
            offline_at[which] = _first_in_window(online, went_off, start[which], end[which])
        for which, p in self._by_kind(positions, _ONOFF):
            online, changes = self._onoff_state(p, start[which])
            offline_at[which] = _first_in_window(online, changes, start[which], end[which])
        return offline_at

    def next_online(self, positions: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        """The earliest time ≥ ``t`` at which each sensor is online (``t`` itself if it is; +inf if never again)."""
        positions, t = self._arguments(positions, t)
        online_from = t.copy()
        for which, p in self._by_kind(positions, _TRACE):
            online_from[which] = self._trace_next_online(p, t[which])
        for which, p in self._by_kind(positions, _ONOFF):
            online, changes = self._onoff_state(p, t[which])
            # Offline now, so the next change of state is the moment it comes back.
            online_from[which] = np.where(online, t[which], changes)
        return online_from

    # ----------------------------------------------------------------------- one sensor at a time

    # The asynchronous loop asks about one sensor per dispatch, thousands of times a second; these answer
    # for one fleet position with plain scalars, skipping the vectorized queries' array set-up. They give
    # exactly the vectorized answers (tested against them).

    def is_online(self, position: int, t: float) -> bool:
        """``online_at`` for one sensor and time."""
        return self._state_one(int(position), float(t))[0]

    def offline_within(self, position: int, start: float, end: float) -> float:
        """``first_offline`` for one sensor: the first time in [start, end] it is offline, +inf if never."""
        online, goes_off = self._state_one(int(position), float(start))
        if not online:
            return float(start)
        return goes_off if goes_off <= end else math.inf

    def _state_one(self, p: int, t: float) -> tuple[bool, float]:
        """(online at t, when it next goes offline if online, else nan)."""
        if not (math.isfinite(t) and t >= 0) or not 0 <= p < len(self._sensor_id):
            self._arguments(p, t)  # raises the vectorized queries' error
        kind = self._kind[p]
        if kind == _ONOFF:
            while self._on_len[p] == 0 or self._bounds[self._on_lo[p] + self._on_len[p] - 1] <= t:
                self._add_block(np.array([p]))
            lo = int(self._on_lo[p])
            changed = int(np.searchsorted(self._bounds[lo:lo + int(self._on_len[p])], t, side="right"))
            online = bool(self._on_first[p]) != (changed % 2 == 1)
            return online, float(self._bounds[lo + changed]) if online else math.nan
        if kind == _TRACE:
            period = float(self._periods[self._group[p]])
            tau = math.fmod(t, period) if math.isfinite(period) else t
            lo = int(self._trace_lo[p])
            started = int(np.searchsorted(self._trace_start[lo:lo + int(self._trace_len[p])], tau, side="right"))
            current = lo + max(started - 1, 0)
            online = started > 0 and tau < self._trace_end[current]
            return online, (t - tau) + float(self._trace_off[current]) if online else math.nan
        return True, math.inf

    # ----------------------------------------------------------------------- helpers

    def _arguments(self, positions: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
        positions = np.atleast_1d(np.asarray(positions)).reshape(-1)
        if positions.size and not np.issubdtype(positions.dtype, np.integer):
            raise TypeError(f"positions must be integer fleet positions, got dtype {positions.dtype}")
        positions = positions.astype(np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self._sensor_id)):
            raise IndexError(
                f"fleet positions must lie in [0, {len(self._sensor_id)}), got {positions.min()}…{positions.max()}"
            )
        times = np.asarray(t, dtype=np.float64)
        if times.ndim > 1 or (times.ndim == 1 and len(times) != len(positions)):
            raise ValueError(f"times must be a scalar or one per position ({len(positions)}), got shape {times.shape}")
        times = np.broadcast_to(times, positions.shape).copy()
        if not np.all(np.isfinite(times)) or np.any(times < 0):
            raise ValueError("virtual times must be finite and non-negative")
        return positions, times

    def _by_kind(self, positions: np.ndarray, kind: int) -> list[tuple[np.ndarray, np.ndarray]]:
        which = np.flatnonzero(self._kind[positions] == kind)
        return [(which, positions[which])] if len(which) else []

    def _trace_cycle(self, positions: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(period, time within the cycle, cycle start) for each trace query; non-periodic traces have one cycle."""
        period = self._periods[self._group[positions]]
        periodic = np.isfinite(period)
        tau = t.copy()
        tau[periodic] = np.mod(t[periodic], period[periodic])
        return period, tau, t - tau

    def _trace_state(self, positions: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(online at t, when the sensor next goes offline if it is online)."""
        _, tau, cycle_start = self._trace_cycle(positions, t)
        lo = self._trace_lo[positions]
        started = _count_at_most(self._trace_start, lo, self._trace_len[positions], tau)
        current = lo + np.maximum(started - 1, 0)  # the last interval that started by tau, if any
        online = (started > 0) & (tau < self._trace_end[current])
        return online, np.where(online, cycle_start + self._trace_off[current], np.nan)

    def _trace_next_online(self, positions: np.ndarray, t: np.ndarray) -> np.ndarray:
        period, tau, cycle_start = self._trace_cycle(positions, t)
        lo, n = self._trace_lo[positions], self._trace_len[positions]
        started = _count_at_most(self._trace_start, lo, n, tau)
        current = lo + np.maximum(started - 1, 0)
        online = (started > 0) & (tau < self._trace_end[current])
        later_this_cycle = started < n
        nxt = self._trace_start[np.where(later_this_cycle, lo + started, lo)]
        return np.select(
            [online, later_this_cycle, np.isfinite(period)],
            [t, cycle_start + nxt, cycle_start + period + nxt],
            default=np.inf,
        )

    def _onoff_state(self, positions: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(online at t, the time of the sensor's next change of state after t)."""
        self._generate_past(positions, t)
        lo, n = self._on_lo[positions], self._on_len[positions]
        changed = _count_at_most(self._bounds, lo, n, t)  # < n: the horizon lies past t
        online = self._on_first[positions] ^ (changed % 2 == 1)
        return online, self._bounds[lo + changed]

    def _generate_past(self, positions: np.ndarray, t: np.ndarray) -> None:
        """Draw blocks until every sensor's last generated change of state lies after its t."""
        while True:
            short = self._last_change(positions) <= t
            if not short.any():
                return
            self._add_block(np.unique(positions[short]))

    def _add_block(self, positions: np.ndarray) -> None:
        """Append the next block of on/off durations for each of these (distinct) positions."""
        n = self._on_len[positions]
        block = n // _STEPS
        fresh = block == 0
        uniform = np.zeros(len(positions))
        durations = np.empty((len(positions), _STEPS))
        keys = np.stack([self._sensor_id[positions], block], axis=1)
        for row, rng in enumerate(keyed_streams(self._seed, AVAILABILITY, keys)):
            if fresh[row]:
                uniform[row] = rng.random()
            durations[row] = rng.standard_exponential(_STEPS)
        mean_on, mean_off = self._onoff_means[self._group[positions]].T
        first = positions[fresh]
        self._on_first[first] = uniform[fresh] < (mean_on / (mean_on + mean_off))[fresh]
        starts_on = self._on_first[positions]
        # Blocks hold an even number of durations, so each starts in the sensor's initial state.
        scale = np.empty_like(durations)
        scale[:, 0::2] = np.where(starts_on, mean_on, mean_off)[:, None]
        scale[:, 1::2] = np.where(starts_on, mean_off, mean_on)[:, None]
        origin = np.maximum(self._last_change(positions), 0.0)
        new = origin[:, None] + np.cumsum(durations * scale, axis=1)

        # A sensor whose slot is full moves to a slot twice the size at the end of _bounds (amortized copying).
        lo, cap = self._on_lo[positions], self._on_cap[positions]
        size = n + _STEPS
        moving = size > cap
        if moving.any():
            movers = positions[moving]
            new_cap = np.where(n[moving] > 0, 2 * size[moving], size[moving])
            dest = self._used + np.concatenate(([0], np.cumsum(new_cap)[:-1]))
            needed = self._used + int(new_cap.sum())
            if needed > len(self._bounds):
                grown = np.empty(max(needed, 2 * len(self._bounds)))
                grown[: self._used] = self._bounds[: self._used]
                self._bounds = grown
            kept = n[moving]
            self._bounds[_ranges(dest, kept)] = self._bounds[_ranges(lo[moving], kept)]
            self._garbage += int(self._on_cap[movers].sum())
            self._on_lo[movers], self._on_cap[movers] = dest, new_cap
            self._used = needed
        self._bounds[_ranges(self._on_lo[positions] + n, np.full(len(positions), _STEPS))] = new.reshape(-1)
        self._on_len[positions] = size
        if self._garbage > max(self._used // 3, 1 << 16):  # abandoned slots are a third of the store
            self._compact()

    def _last_change(self, positions: np.ndarray) -> np.ndarray:
        """Each sensor's last generated change of state; -inf if none is generated yet."""
        n = self._on_len[positions]
        last = np.full(len(positions), -np.inf)
        some = n > 0
        last[some] = self._bounds[self._on_lo[positions[some]] + n[some] - 1]
        return last

    def _compact(self) -> None:
        """Drop abandoned slots; every live slot keeps its spare capacity."""
        live = np.flatnonzero(self._on_len)
        cap = self._on_cap[live]
        dest = np.concatenate(([0], np.cumsum(cap)[:-1])) if len(live) else cap
        bounds = np.empty(int(cap.sum()))
        n = self._on_len[live]
        bounds[_ranges(dest, n)] = self._bounds[_ranges(self._on_lo[live], n)]
        self._bounds, self._on_lo[live] = bounds, dest
        self._used, self._garbage = len(bounds), 0

    def __getstate__(self) -> dict[str, Any]:
        # Ship only live on/off changes, without spare capacity.
        state = self.__dict__.copy()
        live = np.flatnonzero(self._on_len)
        n = self._on_len[live]
        state["_bounds"] = self._bounds[_ranges(self._on_lo[live], n)]
        state["_on_lo"] = np.zeros_like(self._on_lo)
        state["_on_lo"][live] = np.concatenate(([0], np.cumsum(n)[:-1])) if len(live) else n
        state["_on_cap"] = self._on_len.copy()
        state["_used"], state["_garbage"] = len(state["_bounds"]), 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Ray hands out arrays zero-copy from its object store, read-only; the on/off tables must grow.
        for name in ("_on_lo", "_on_len", "_on_cap", "_on_first", "_bounds"):
            if not state[name].flags.writeable:
                state[name] = state[name].copy()
        self.__dict__.update(state)


def _first_in_window(online: np.ndarray, goes_off: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return np.where(~online, start, np.where(goes_off <= end, goes_off, np.inf))


def _ranges(lo: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Concatenated index ranges [lo[i], lo[i] + n[i])."""
    total = int(n.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(n)
    return np.arange(total, dtype=np.int64) + np.repeat(lo - (ends - n), n)


def _count_at_most(values: np.ndarray, lo: np.ndarray, n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For each query, how many of the sorted values[lo : lo + n] are ≤ x (a binary search per query, vectorized)."""
    left = np.zeros(len(x), dtype=np.int64)
    right = n.astype(np.int64)
    if len(x) == 0:
        return left
    if len(x) <= 8:  # a few queries (one async dispatch): plain searches beat the vectorized loop
        for i in range(len(x)):
            start = int(lo[i])
            left[i] = np.searchsorted(values[start:start + int(right[i])], x[i], side="right")
        return left
    for _ in range(int(right.max()).bit_length() + 1):
        searching = left < right
        if not searching.any():
            break
        mid = (left + right) // 2
        at_most = searching & (values[np.where(searching, lo + mid, 0)] <= x)
        left = np.where(at_most, mid + 1, left)
        right = np.where(searching & ~at_most, mid, right)
    return left


# --------------------------------------------------------------------------- trace files


def _fail(path: Path, message: str) -> DataError:
    return DataError(f"availability trace {path}: {message}")


def _read_table(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise _fail(path, f"has suffix {path.suffix!r}; expected a .csv or .parquet file with {_TRACE_COLUMNS}")
    if not path.exists():
        raise _fail(path, f"does not exist; expected a {suffix} file with {_TRACE_COLUMNS}")
    if not path.is_file():
        raise _fail(path, f"is not a file; expected a {suffix} file with {_TRACE_COLUMNS}")
    try:
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
        import pyarrow.parquet as pq

        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise _fail(path, f"is not a readable {kind} file ({exc}); expected {_TRACE_COLUMNS}") from None


def _read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sensor, start_s, end_s) of every row, validated; rows count from 1, header not counted."""
    table = _read_table(path)
    for column in ("sensor", "start_s", "end_s"):
        if column not in table.column_names:
            has = ", ".join(repr(c) for c in table.column_names) or "no columns"
            raise _fail(path, f"column '{column}' is missing (it has {has}); expected {_TRACE_COLUMNS}")
    if table.num_rows == 0:
        return np.empty(0, np.int64), np.empty(0), np.empty(0)
    columns = {}
    for column, want, meaning in (
        ("sensor", pa.int64(), "integer sensor ids"),
        ("start_s", pa.float64(), "numbers (virtual seconds)"),
        ("end_s", pa.float64(), "numbers (virtual seconds)"),
    ):
        data = table.column(column)
        good_type = pa.types.is_integer(data.type) or (column != "sensor" and pa.types.is_floating(data.type))
        if not good_type:
            raise _fail(path, f"column '{column}' must hold {meaning}, it has type {data.type}")
        if data.null_count:
            row = int(np.flatnonzero(data.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise _fail(path, f"column '{column}' has an empty value in row {row}; every row needs {meaning}")
        try:
            columns[column] = pc.cast(data, want).to_numpy()
        except pa.ArrowInvalid as exc:
            raise _fail(path, f"column '{column}' must hold {meaning} that fit in {want} ({exc})") from None
    sensor, start, end = columns["sensor"], columns["start_s"], columns["end_s"]
    for column, values in (("start_s", start), ("end_s", end)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = bad[0]
            raise _fail(path, f"row {i + 1} (sensor {sensor[i]}): {column} is {values[i]}; expected a finite number")
    bad = np.flatnonzero(start < 0)
    if len(bad):
        i = bad[0]
        raise _fail(path, f"row {i + 1} (sensor {sensor[i]}): start_s is {start[i]:g}; expected start_s ≥ 0")
    bad = np.flatnonzero(end <= start)
    if len(bad):
        i = bad[0]
        raise _fail(
            path, f"row {i + 1} (sensor {sensor[i]}): end_s ({end[i]:g}) must be greater than start_s ({start[i]:g})"
        )
    order = np.lexsort((start, sensor))
    overlap = np.flatnonzero((sensor[order][1:] == sensor[order][:-1]) & (start[order][1:] < end[order][:-1]))
    if len(overlap):
        a, b = sorted((order[overlap[0]], order[overlap[0] + 1]))
        raise _fail(
            path,
            f"rows {a + 1} and {b + 1} give sensor {sensor[a]} overlapping intervals "
            f"[{start[a]:g}, {end[a]:g}) and [{start[b]:g}, {end[b]:g}); a sensor's intervals must not overlap",
        )
    return sensor, start, end


def _check_within_period(path: Path, sensor: np.ndarray, start: np.ndarray, end: np.ndarray, period: float) -> None:
    bad = np.flatnonzero(end > period)
    if len(bad):
        i = bad[0]
        raise _fail(
            path,
            f"row {i + 1} (sensor {sensor[i]}): interval [{start[i]:g}, {end[i]:g}) ends after period_s = {period:g}; "
            "a repeating trace's intervals must lie within [0, period_s]",
        )


def _tier_intervals(
    positions: np.ndarray, ids: np.ndarray, sensor: np.ndarray, start: np.ndarray, end: np.ndarray, period: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The trace's intervals for one tier's sensors: (position, start, end, offline time), touching intervals merged.

    Rows for sensors outside the tier are dropped. A periodic sensor whose last
    interval ends at period_s and whose first starts at 0 stays online across
    the wrap, so that interval's offline time is period_s + the first one's end;
    a sensor online over the whole cycle is left out (always online).
    """
    by_id = np.argsort(ids, kind="stable")
    slot = np.searchsorted(ids[by_id], sensor)
    slot = np.minimum(slot, max(len(ids) - 1, 0))
    known = (ids[by_id][slot] == sensor) if len(ids) else np.zeros(len(sensor), dtype=bool)
    pos = positions[by_id][slot[known]]
    start, end = start[known], end[known]
    order = np.lexsort((start, pos))
    pos, start, end = pos[order], start[order], end[order]
    # Merge intervals that touch: a new run starts at a new sensor or after a gap.
    begins = np.ones(len(pos), dtype=bool)
    begins[1:] = (pos[1:] != pos[:-1]) | (start[1:] != end[:-1])
    first = np.flatnonzero(begins)
    last = np.append(first[1:] - 1, len(pos) - 1) if len(first) else first
    pos, start, end = pos[first], start[first], end[last]
    off = end.copy()
    if math.isfinite(period) and len(pos):
        head = np.ones(len(pos), dtype=bool)
        head[1:] = pos[1:] != pos[:-1]
        tail = np.append(head[1:], True)
        head_at = np.flatnonzero(head)
        tail_at = np.flatnonzero(tail)
        wraps = (start[head_at] == 0) & (end[tail_at] == period)
        whole = wraps & (head_at == tail_at)  # one run covering the whole cycle: never offline
        off[tail_at[wraps & ~whole]] = period + end[head_at[wraps & ~whole]]
        keep = ~np.isin(pos, pos[head_at[whole]])
        pos, start, end, off = pos[keep], start[keep], end[keep], off[keep]
    return pos, start, end, off

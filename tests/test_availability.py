"""Sensor availability in virtual time: always online, seeded on/off processes, and trace files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysim.availability import Availability
from raysim.errors import DataError
from raysim.fleet.profiles import build_profiles
from raysim.scenario import Scenario

INF = np.inf


def _tier(availability, name="t", share=1.0):
    return {"name": name, "share": share, "seconds_per_sample": 0.001, "up_mbps": 1, "down_mbps": 1,
            "availability": availability}


def _availability(tiers, ids, seed=3, base_dir="."):
    ids = np.asarray(ids, dtype=np.int64)
    scenario = Scenario(name="t", seed=seed, fleet={"sensors": len(ids), "tiers": tiers}, aggregation={"cohort": 1},
                        base_dir=base_dir)
    profiles = build_profiles(scenario, ids, np.full(len(ids), 5))
    return Availability.from_scenario(scenario, profiles), profiles


def _write(path: Path, rows, columns=("sensor", "start_s", "end_s")) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)}), path)
    else:
        path.write_text("\n".join([",".join(columns)] + [",".join(str(v) for v in r) for r in rows]) + "\n")
    return path


# Sensor 7 is online over [0, 10) and [20, 30) (rows deliberately unsorted); sensor 9 over [5, 6);
# sensor 3 is not in the file; sensor 999 is not in the fleet.
TRACE_ROWS = [(7, 20, 30), (9, 5.0, 6.0), (7, 0, 10), (999, 0, 1)]


@pytest.fixture(params=["csv", "parquet"])
def trace_file(request, tmp_path):
    return _write(tmp_path / f"trace.{request.param}", TRACE_ROWS)


def _trace(path, period_s=None, ids=(3, 7, 9)):
    availability = {"kind": "trace", "path": str(path), **({"period_s": period_s} if period_s else {})}
    avail, profiles = _availability([_tier(availability)], ids)
    return avail, {int(s): int(p) for s, p in zip(ids, profiles.positions(list(ids)))}


# --------------------------------------------------------------------------- traces


def test_trace_answers_hand_computed_cases(trace_file):
    avail, pos = _trace(trace_file)
    s7 = [pos[7]]
    assert avail.online_at(s7, 5).tolist() == [True]
    assert avail.online_at(s7, 15).tolist() == [False]
    assert avail.online_at(s7, 10).tolist() == [False]  # intervals are half-open
    assert avail.online_at(s7, 0).tolist() == [True]
    assert avail.first_offline(s7, 2, 12).tolist() == [10]
    assert avail.first_offline(s7, 2, 10).tolist() == [10]  # the window's end is included
    assert avail.first_offline(s7, 2, 9.5).tolist() == [INF]
    assert avail.first_offline(s7, 21, 25).tolist() == [INF]
    assert avail.first_offline(s7, 15, 40).tolist() == [15]  # offline at the start
    assert avail.next_online(s7, 12).tolist() == [20]
    assert avail.next_online(s7, 5).tolist() == [5]
    assert avail.next_online(s7, 30).tolist() == [INF]  # the trace has ended and does not repeat
    assert avail.next_online(s7, 31).tolist() == [INF]
    assert avail.online_at(s7, 45).tolist() == [False]


def test_trace_queries_are_vectorized_over_sensors_and_times(trace_file):
    avail, pos = _trace(trace_file)
    positions = [pos[7], pos[9], pos[3], pos[7]]
    assert avail.online_at(positions, [5, 5, 5, 25]).tolist() == [True, True, True, True]
    assert avail.online_at(positions, 5.5).tolist() == [True, True, True, True]
    assert avail.online_at(positions, 6).tolist() == [True, False, True, True]
    assert avail.first_offline(positions, [1, 1, 1, 22], [100, 100, 100, 29]).tolist() == [10, 1, INF, INF]
    assert avail.next_online(positions, [12, 2, 12, 35]).tolist() == [20, 5, 12, INF]


def test_sensor_missing_from_the_trace_is_always_online(trace_file):
    avail, pos = _trace(trace_file, period_s=40)
    s3 = [pos[3]] * 4
    times = [0, 10, 15, 1e6]
    assert avail.online_at(s3, times).all()
    assert (avail.first_offline(s3, times, 1e7) == INF).all()
    assert avail.next_online(s3, times).tolist() == times


def test_periodic_trace_repeats(trace_file):
    avail, pos = _trace(trace_file, period_s=40)
    s7 = [pos[7]]
    assert avail.online_at(s7, 45).tolist() == [True]
    assert avail.online_at(s7, 55).tolist() == [False]
    assert avail.next_online(s7, 52).tolist() == [60]
    assert avail.next_online(s7, 35).tolist() == [40]  # after the last interval: the next cycle's first
    assert avail.first_offline(s7, 45, 100).tolist() == [50]
    assert avail.online_at(s7, 4000 + 25).tolist() == [True]
    assert avail.next_online([pos[9]], 7).tolist() == [45]


def test_touching_intervals_and_the_wrap_of_a_period_are_one_online_stretch(tmp_path):
    path = _write(tmp_path / "touch.csv", [(1, 10, 20), (1, 0, 10), (2, 0, 5), (2, 30, 40), (3, 0, 40)])
    plain, pos = _trace(path, ids=(1, 2, 3))
    assert plain.first_offline([pos[1]], 5, 100).tolist() == [20]
    assert plain.first_offline([pos[2]], 35, 100).tolist() == [40]
    periodic, pos = _trace(path, period_s=40, ids=(1, 2, 3))
    assert periodic.first_offline([pos[2]], 35, 100).tolist() == [45]  # [30, 40) runs into the next [0, 5)
    assert periodic.first_offline([pos[3]], 0, 1e6).tolist() == [INF]  # online over the whole cycle
    assert periodic.next_online([pos[1]], 25).tolist() == [40]


def test_relative_trace_path_is_resolved_against_the_scenario_folder(tmp_path):
    _write(tmp_path / "rel.csv", [(5, 0, 1)])
    avail, _ = _availability([_tier({"kind": "trace", "path": "rel.csv"})], [5], base_dir=str(tmp_path))
    assert avail.online_at([0], 1.5).tolist() == [False]
    assert avail.online_at([0], 0.5).tolist() == [True]


def test_trace_applies_only_to_its_tier(tmp_path):
    path = _write(tmp_path / "t.csv", [(s, 0, 1) for s in range(10)])
    tiers = [_tier({"kind": "trace", "path": str(path)}, "traced", 0.5), _tier({"kind": "always"}, "free", 0.5)]
    avail, profiles = _availability(tiers, np.arange(10))
    online = avail.online_at(np.arange(10), 5)
    assert online.tolist() == (profiles.tier == 1).tolist()


BAD_TRACES = {
    "missing column": ([(1, 0, 1)], ("sensor", "start_s", "stop_s"), "end_s"),
    "end before start": ([(1, 0, 1), (2, 5, 3)], None, "row 2"),
    "empty interval": ([(1, 4, 4)], None, "end_s"),
    "negative start": ([(1, -1, 3)], None, "start_s"),
    "overlap": ([(1, 0, 10), (2, 0, 10), (1, 5, 15)], None, "rows 1 and 3"),
    "text sensor": ([("a", 0, 1)], None, "sensor"),
    "text time": ([(1, "soon", 1)], None, "start_s"),
    "float sensor": ([(1.5, 0, 1)], None, "sensor"),
    "outside period": ([(1, 0, 10), (1, 30, 50)], None, "period_s"),
}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_bad_trace_file_raises_data_error_naming_it(tmp_path, case, suffix):
    rows, columns, expected = BAD_TRACES[case]
    path = _write(tmp_path / f"bad{suffix}", rows, columns or ("sensor", "start_s", "end_s"))
    with pytest.raises(DataError) as info:
        _trace(path, period_s=40, ids=(1, 2))
    assert str(path) in str(info.value) and expected in str(info.value)


def test_empty_value_in_a_trace_row_is_named(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("sensor,start_s,end_s\n1,0,1\n2,,4\n")
    with pytest.raises(DataError, match=r"gap\.csv.*'start_s'.*row 2"):
        _trace(path, ids=(1, 2))


@pytest.mark.parametrize("name, content, expected", [
    ("absent.csv", None, "does not exist"),
    ("junk.parquet", b"not parquet at all", "Parquet"),
    ("trace.txt", b"sensor,start_s,end_s\n1,0,1\n", ".csv or .parquet"),
])
def test_unreadable_trace_file_raises_data_error(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        _trace(path, ids=(1,))
    assert str(path) in str(info.value) and expected in str(info.value)


def test_trace_with_only_a_header_leaves_everyone_online(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("sensor,start_s,end_s\n")
    avail, _ = _trace(path, ids=(1, 2))
    assert avail.online_at([0, 1], 3).all()


# --------------------------------------------------------------------------- on/off


ONOFF = {"kind": "onoff", "mean_on_s": 30.0, "mean_off_s": 10.0}


def test_onoff_long_run_fraction_online_matches_the_means():
    avail, _ = _availability([_tier(ONOFF)], np.arange(500))
    positions = np.repeat(np.arange(500), 100)
    times = np.tile(np.arange(100) * 200.0, 500)  # samples 200 s apart: 5 cycles, nearly independent
    fraction = avail.online_at(positions, times).mean()
    # 50,000 samples of a 0.75 Bernoulli: standard error 0.002
    assert abs(fraction - 0.75) < 0.012


def test_onoff_is_stationary_from_time_zero():
    avail, _ = _availability([_tier(ONOFF)], np.arange(4000) * 13 + 1)
    # 4000 sensors: standard error of the fraction online at 0 is 0.007
    assert abs(avail.online_at(np.arange(4000), 0.0).mean() - 0.75) < 0.035


def test_onoff_durations_are_exponential_with_the_given_means():
    sensors = 400
    avail, _ = _availability([_tier(ONOFF)], np.arange(sensors))
    positions = np.arange(sensors)
    t = np.zeros(sensors)
    on, off = [], []
    for _ in range(50):  # 50 cycles of 40 s go past the first generated block of each sensor
        came_on = avail.next_online(positions, t)
        went_off = avail.first_offline(positions, came_on, np.inf)
        t = avail.next_online(positions, went_off)
        on.append(went_off - came_on)
        off.append(t - went_off)
    on, off = np.concatenate(on), np.concatenate(off)
    assert t.min() > 1280  # the walk went past 32 on/off pairs of 40 s
    # 20,000 exponential durations: standard error of the mean is mean/141
    assert abs(on.mean() - 30.0) < 1.0
    assert abs(off.mean() - 10.0) < 0.35
    assert abs(on.std() / on.mean() - 1.0) < 0.05  # exponential: std = mean
    assert (on > 0).all() and (off > 0).all()


def test_onoff_answers_agree_with_each_other():
    avail, _ = _availability([_tier(ONOFF)], np.arange(300))
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 300, 3000)
    t = rng.uniform(0, 5000, 3000)
    online = avail.online_at(positions, t)
    back = avail.next_online(positions, t)
    assert (back[online] == t[online]).all() and (back[~online] > t[~online]).all()
    assert avail.online_at(positions, back).all()
    assert not avail.online_at(positions[~online], (t[~online] + back[~online]) / 2).any()
    gone = avail.first_offline(positions, t, t + 50)
    assert (gone[~online] == t[~online]).all()
    left = online & np.isfinite(gone)
    assert not avail.online_at(positions[left], gone[left]).any()
    assert avail.online_at(positions[left], (t[left] + gone[left]) / 2).all()
    stayed = online & ~np.isfinite(gone)
    for step in np.linspace(0, 50, 11):
        assert avail.online_at(positions[stayed], t[stayed] + step).all()


def _questions(count):
    rng = np.random.default_rng(42)
    positions = rng.integers(0, count, 2000)
    starts = rng.uniform(0, 20_000, 2000)
    return positions, starts


def _answers(avail, positions, starts):
    return (avail.online_at(positions, starts), avail.first_offline(positions, starts, starts + 100),
            avail.next_online(positions, starts))


def test_onoff_answers_do_not_depend_on_query_order_or_company():
    together, _ = _availability([_tier(ONOFF)], np.arange(200))
    positions, starts = _questions(200)
    expected = _answers(together, positions, starts)

    alone, _ = _availability([_tier(ONOFF)], np.arange(200))
    alone.online_at(np.arange(0, 200, 7), 90_000.0)  # some sensors generated far ahead first
    for i in reversed(range(0, 2000, 97)):  # then one question at a time, backwards
        single = _answers(alone, positions[i:i + 1], starts[i:i + 1])
        for got, want in zip(single, expected):
            assert got[0] == want[i]


def test_onoff_sensor_behaves_the_same_in_any_fleet():
    small, _ = _availability([_tier(ONOFF)], np.arange(50), seed=8)
    big, profiles = _availability([_tier(ONOFF)], np.arange(-250, 250)[::-1], seed=8)
    positions, starts = _questions(50)
    in_big = profiles.positions(positions)  # the same sensor ids
    for got, want in zip(_answers(big, in_big, starts), _answers(small, positions, starts)):
        np.testing.assert_array_equal(got, want)
    other_seed, _ = _availability([_tier(ONOFF)], np.arange(50), seed=9)
    assert not np.array_equal(_answers(other_seed, positions, starts)[2], _answers(small, positions, starts)[2])


def test_always_online_tier_is_always_online():
    tiers = [_tier({"kind": "always"}, "steady", 0.5), _tier(ONOFF, "flaky", 0.5)]
    avail, profiles = _availability(tiers, np.arange(400))
    steady = np.flatnonzero(profiles.tier == 0)
    times = np.linspace(0, 1e5, len(steady))
    assert avail.online_at(steady, times).all()
    assert (avail.first_offline(steady, times, times + 1e4) == INF).all()
    np.testing.assert_array_equal(avail.next_online(steady, times), times)
    flaky = np.flatnonzero(profiles.tier == 1)
    assert not avail.online_at(flaky, 500.0).all()  # ~50 of 200 are off at any time


def test_pickle_round_trip_gives_identical_answers():
    tiers = [_tier(ONOFF, "flaky", 0.5), _tier({"kind": "always"}, "steady", 0.5)]
    avail, _ = _availability(tiers, np.arange(300))
    positions, starts = _questions(300)
    avail.online_at(positions[:500], starts[:500] * 3)  # generate some state, some of it superseded
    copy = pickle.loads(pickle.dumps(avail))
    for got, want in zip(_answers(copy, positions, starts), _answers(avail, positions, starts)):
        np.testing.assert_array_equal(got, want)
    fresh = pickle.loads(pickle.dumps(_availability(tiers, np.arange(300))[0]))
    for got, want in zip(_answers(fresh, positions, starts), _answers(avail, positions, starts)):
        np.testing.assert_array_equal(got, want)


def test_unpickled_from_read_only_buffers_still_grows():
    # Ray deserializes numpy arrays zero-copy from its object store, as read-only arrays.
    avail, _ = _availability([_tier(ONOFF)], np.arange(100))
    avail.online_at(np.arange(50), 100.0)
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(avail, protocol=5, buffer_callback=buffers.append)
    shipped = pickle.loads(payload, buffers=[memoryview(bytes(b.raw())) for b in buffers])
    positions, starts = _questions(100)
    for got, want in zip(_answers(shipped, positions, starts), _answers(avail, positions, starts)):
        np.testing.assert_array_equal(got, want)


def test_nothing_is_generated_for_sensors_never_asked():
    avail, _ = _availability([_tier(ONOFF)], np.arange(5000))
    empty = len(pickle.dumps(avail))
    avail.online_at(np.arange(10), 10.0)
    few = len(pickle.dumps(avail)) - empty
    avail.online_at(np.arange(5000), 10.0)
    everyone = len(pickle.dumps(avail)) - empty
    assert few * 100 < everyone


def test_bad_queries_are_rejected():
    avail, _ = _availability([_tier(ONOFF)], np.arange(10))
    with pytest.raises(ValueError):
        avail.online_at([1], -1.0)
    with pytest.raises(ValueError):
        avail.next_online([1], np.nan)
    with pytest.raises(ValueError):
        avail.first_offline([1, 2], 5.0, [10.0, 4.0])
    with pytest.raises(ValueError):
        avail.online_at([1, 2], [1.0, 2.0, 3.0])
    with pytest.raises(IndexError):
        avail.online_at([10], 1.0)
    assert avail.online_at(np.array([], dtype=np.int64), 1.0).shape == (0,)


def test_growing_step_by_step_or_at_once_gives_the_same_process():
    sensors = 2000
    stepwise, _ = _availability([_tier(ONOFF)], np.arange(sensors))
    at_once, _ = _availability([_tier(ONOFF)], np.arange(sensors))
    positions = np.arange(sensors)
    for t in np.arange(1, 13) * 1000.0:  # ~ one block of 32 on/off pairs of 40 s per step
        stepwise.online_at(positions, t)
    at_once.online_at(positions, 12_000.0)
    rng = np.random.default_rng(5)
    probe = rng.uniform(0, 12_000, sensors)
    for got, want in zip(_answers(stepwise, positions, probe), _answers(at_once, positions, probe)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("period_s", [None, 40])
def test_one_sensor_queries_give_the_vectorized_answers(tmp_path, period_s):
    rows = [(sensor, start, start + 5) for sensor in range(3, 303) for start in range(sensor % 4, 40, 10)]
    trace = _write(tmp_path / "trace.csv", rows)  # every sensor online 5 s of every 10 s, until 40 s
    tiers = [_tier(ONOFF, "flaky", 0.4), _tier({"kind": "always"}, "steady", 0.2),
             _tier({"kind": "trace", "path": str(trace), **({"period_s": period_s} if period_s else {})}, "traced", 0.4)]
    vectorized, profiles = _availability(tiers, np.arange(3, 303))
    one_by_one, _ = _availability(tiers, np.arange(3, 303))
    rng = np.random.default_rng(11)
    positions = rng.integers(0, 300, 3000)
    starts = rng.integers(0, 100, 3000) * 0.5  # many queries land exactly on a trace's change of state
    starts[::2] = rng.uniform(0, 3000, 1500)
    ends = starts + rng.exponential(30, 3000)
    online = vectorized.online_at(positions, starts)
    gone = vectorized.first_offline(positions, starts, ends)
    assert len(np.unique(profiles.tier[positions])) == 3 and 0 < online.mean() < 1 and np.isfinite(gone).any()
    for i in range(3000):
        assert one_by_one.is_online(positions[i], starts[i]) == online[i]
        assert one_by_one.offline_within(positions[i], starts[i], ends[i]) == gone[i]
    with pytest.raises(ValueError):
        one_by_one.is_online(0, -1.0)
    with pytest.raises(IndexError):
        one_by_one.offline_within(300, 1.0, 2.0)

"""Heterogeneity on the virtual clock, straggler policies and asynchronous aggregation, end to end."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

import raysim
from helpers import assert_tables_identical, with_changes
from raysim.metrics import WALL_CLOCK_COLUMNS

pytestmark = pytest.mark.ray

TIERS = [
    {"name": "fast", "share": 0.3, "seconds_per_sample": 0.001, "jitter_sigma": 0.2, "up_mbps": 20, "down_mbps": 50,
     "latency_ms": 20},
    {"name": "flaky", "share": 0.3, "seconds_per_sample": 0.0025, "speed_sigma": 0.3, "up_mbps": 5, "down_mbps": 20,
     "latency_ms": 200, "loss": 0.2, "max_retries": 1, "availability": {"kind": "onoff", "mean_on_s": 40, "mean_off_s": 20}},
    {"name": "slow", "share": 0.4, "seconds_per_sample": 0.0057, "speed_sigma": 0.8, "up_mbps": 0.25, "down_mbps": 1,
     "bandwidth_sigma": 0.5, "latency_ms": 100, "availability": {"kind": "onoff", "mean_on_s": 30, "mean_off_s": 30}},
]


def scenario(aggregation: dict, **changes) -> dict:
    return with_changes({
        "name": "hetero",
        "seed": 5,
        "fleet": {"sensors": 80, "tiers": TIERS,
                  "data": {"samples_per_sensor": 16, "test_samples": 200, "test_sensors": 5}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 4, "batch_size": 8},
        "aggregation": aggregation,
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False},
    }, changes)


FEDBUFF = {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 12, "buffer_size": 4, "max_staleness": 3}}
DEADLINE = {"cohort": 12, "stragglers": {"policy": "deadline", "deadline_s": 0.45}}
OVERCOMMIT = {"cohort": 10, "stragglers": {"policy": "over-commit", "overcommit": 1.5}}


def events_of(result):
    return pq.read_table(result.run_dir / "events.parquet").to_pandas()


@pytest.mark.parametrize("aggregation", [DEADLINE, FEDBUFF], ids=["sync-deadline", "fedbuff"])
def test_timings_drops_and_events_do_not_depend_on_actor_count(ray_session, tmp_path, aggregation):
    runs = [raysim.run(scenario(aggregation, **{"cluster.client_actors": n}), out_dir=tmp_path / f"a{n}")
            for n in (1, 2, 4)]
    base = pq.read_table(runs[0].run_dir / "events.parquet")
    assert set(base.column("outcome").to_pylist()) - {"applied"}, "the scenario should drop some updates"
    for other in runs[1:]:
        assert_tables_identical(pq.read_table(other.run_dir / "events.parquet"), base)
        for column in runs[0].metrics.column_names:
            ours, theirs = other.metrics[column].to_pylist(), runs[0].metrics[column].to_pylist()
            if column in WALL_CLOCK_COLUMNS:
                continue
            if isinstance(theirs[0], str):
                assert ours == theirs, column
            else:
                assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6, nan_ok=True), column


def test_deadline_discards_late_updates_without_training_them(ray_session, tmp_path):
    result = raysim.run(scenario(DEADLINE, **{"training.rounds": 6}), out_dir=tmp_path / "deadline")
    events = events_of(result)
    took = events.arrived_at - events.dispatched_at
    late = events[events.outcome == "late"]
    applied = events[events.outcome == "applied"]
    assert len(late) > 0 and len(applied) > 0
    assert (took[events.outcome == "late"] > 0.45).all()
    assert (took[events.outcome == "applied"] <= 0.45).all()
    assert (late.local_steps == 0).all() and late.train_loss.isna().all()
    assert (applied.local_steps > 0).all()
    metrics = result.metrics.to_pandas()
    for _, row in metrics.iterrows():
        in_round = events[events["round"] == row["round"]]
        if (in_round.outcome != "applied").any():
            assert row.round_duration_s == pytest.approx(0.45)
        assert row.updates_late == (in_round.outcome == "late").sum()
        assert row.trainings_skipped == ((in_round.outcome != "applied") & (in_round.compute_s > 0)).sum()


def test_over_commit_keeps_the_first_k_arrivals(ray_session, tmp_path):
    result = raysim.run(scenario(OVERCOMMIT), out_dir=tmp_path / "overcommit")
    events = events_of(result)
    for _, in_round in events.groupby("round"):
        assert len(in_round) == math.ceil(10 * 1.5)
        applied = in_round[in_round.outcome == "applied"]
        late = in_round[in_round.outcome == "late"]
        assert len(applied) <= 10
        if len(late):
            assert len(applied) == 10
            assert late.arrived_at.min() >= applied.arrived_at.max()
            assert (late.local_steps == 0).all()


def test_rounds_short_of_min_completion_are_skipped_and_change_nothing(ray_session, tmp_path):
    from raysim.models import MLPConfig, init_weights

    spec = scenario({"cohort": 12, "stragglers": {"policy": "deadline", "deadline_s": 0.05, "min_completion": 0.5}})
    result = raysim.run(spec, out_dir=tmp_path / "skipped")
    metrics = result.metrics.to_pandas()
    assert (metrics.status == "skipped").all()
    assert (metrics.updates_applied == 0).all()
    events = events_of(result)
    assert (events.local_steps == 0).all()
    start = init_weights(MLPConfig(hidden=(8,)), 6, 32, 6, seed=5)
    np.testing.assert_array_equal(result.global_weights, start)
    assert result.summary["rounds_skipped"] == len(metrics)


def test_async_invariants_on_a_heterogeneous_fleet(ray_session, tmp_path):
    result = raysim.run(scenario(FEDBUFF, **{"training.rounds": 8}), out_dir=tmp_path / "fedbuff")
    events = events_of(result)
    metrics = result.metrics.to_pandas()
    # Arrivals are processed in virtual-time order.
    assert (np.diff(events.arrived_at.to_numpy()) >= 0).all()
    # A sensor never has two tasks in flight, and at most C sensors are in flight at once.
    for _, tasks in events.groupby("sensor"):
        tasks = tasks.sort_values("dispatched_at")
        assert (tasks.dispatched_at.to_numpy()[1:] >= tasks.arrived_at.to_numpy()[:-1]).all()
    times = np.sort(np.unique(events.dispatched_at))
    in_flight = [((events.dispatched_at <= t) & (events.arrived_at > t)).sum() for t in times]
    assert max(in_flight) <= 12
    # Each server step applies exactly K updates; staleness is the versions elapsed since dispatch.
    applied = events[events.outcome == "applied"]
    assert (applied.groupby("round").size() == 4).all()
    np.testing.assert_array_equal(applied.staleness, applied["round"] - 1 - applied.base_version)
    assert (applied.staleness <= 3).all()
    late = events[events.outcome == "late"]
    assert (late.staleness > 3).all()
    assert metrics["round"].tolist() == list(range(1, 9))
    assert (np.diff(metrics.virtual_time_s) >= 0).all()
    np.testing.assert_allclose(metrics.staleness_mean, applied.groupby("round").staleness.mean().to_numpy())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(result.run_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    histograms = board.Histograms("round/staleness")
    assert [h.step for h in histograms] == list(range(1, 9))
    assert [h.histogram_value.num for h in histograms] == [4] * 8
    for h in histograms:  # one bucket per staleness value, counting the step's applied updates
        counts = applied[applied["round"] == h.step].staleness.value_counts()
        got = {round(limit - 0.5): n for limit, n in zip(h.histogram_value.bucket_limit, h.histogram_value.bucket) if n}
        assert got == counts.to_dict()


def test_fedbuff_with_k_and_c_equal_to_the_cohort_is_a_sync_round(ray_session, tmp_path):
    uniform = {"fleet.tiers": [{"name": "same", "share": 1, "seconds_per_sample": 0.001, "up_mbps": 5, "down_mbps": 5}],
               "fleet.data.quantity_sigma": 0.0, "training.rounds": 1}
    sync = raysim.run(scenario({"cohort": 10}, **uniform), out_dir=tmp_path / "sync")
    fedbuff = raysim.run(scenario({"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 10, "buffer_size": 10}},
                                  **uniform), out_dir=tmp_path / "fedbuff")
    sync_sensors = set(events_of(sync).sensor)
    applied = events_of(fedbuff)
    assert set(applied[applied.outcome == "applied"].sensor) == sync_sensors
    np.testing.assert_allclose(fedbuff.global_weights, sync.global_weights, atol=1e-6)


def test_time_to_target_accuracy_is_reported(ray_session, tmp_path):
    result = raysim.run(scenario({"cohort": 20}, **{"logging.target_accuracy": 0.2, "training.rounds": 3}),
                        out_dir=tmp_path / "target")
    metrics = result.metrics.to_pandas()
    reached = metrics[metrics.accuracy >= 0.2]
    summary = result.summary
    if len(reached):
        first = reached.iloc[0]
        assert summary["round_to_target"] == first["round"]
        assert summary["time_to_target_s"] == first.virtual_time_s
        assert summary["bytes_to_target"] == first.cumulative_bytes_up + first.cumulative_bytes_down
        assert summary["bytes_up_to_target"] == first.cumulative_bytes_up
    else:
        assert summary["time_to_target_s"] is None


def test_a_round_with_nobody_online_waits_for_the_first_sensor(ray_session, tmp_path):
    # Every sensor is offline until 50 s, then online for good.
    (tmp_path / "trace.csv").write_text("sensor,start_s,end_s\n" + "".join(f"{i},50,100000\n" for i in range(20)))
    spec = scenario({"cohort": 5}, **{
        "fleet.sensors": 20, "training.rounds": 2,
        "fleet.tiers": [{"name": "late-risers", "share": 1, "seconds_per_sample": 0.001, "up_mbps": 5, "down_mbps": 5,
                         "availability": {"kind": "trace", "path": str(tmp_path / "trace.csv")}}],
    })
    result = raysim.run(spec, out_dir=tmp_path / "idle")
    metrics = result.metrics.to_pandas()
    assert metrics.status.tolist() == ["idle", "ok"]
    assert metrics.virtual_time_s[0] == pytest.approx(50.0)
    assert metrics.selected.tolist() == [0, 5]
    events = events_of(result)
    assert (events["round"] == 2).all() and (events.dispatched_at >= 50.0).all()

"""How work is spread and summed: balanced shards, columnar shard reads, batched training on the
actors, sums formed on the actors, and the wall-clock and memory figures a run reports."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import raysim
from helpers import assert_same_run, assert_tables_identical, with_changes
from raysim.cluster import Placement, expected_work
from raysim.errors import DataError
from raysim.fleet import store

# ---------------------------------------------------------------------- balanced shards (no Ray)


def _placement(actors: int, per_actor: int | None = None) -> Placement:
    """``actors`` actors; with ``per_actor``, a fixed number of sensors per actor (as the scenario can ask)."""
    return Placement(actors, per_actor or 1, num_cpus=1, num_gpus=0, fixed_size=per_actor is not None)


@settings(max_examples=60, deadline=None)
@given(work=st.lists(st.floats(0.5, 1000), min_size=1, max_size=300), actors=st.integers(1, 9))
def test_balanced_shards_partition_the_fleet_within_one_sensor_of_the_mean(work, actors):
    work = np.array(work)
    shards = _placement(actors).balanced_shards(work)
    assert len(shards) == min(actors, len(work))
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(len(work)))
    loads = np.array([work[s].sum() for s in shards])
    assert loads.max() <= work.sum() / len(shards) + work.max() + 1e-9
    assert all((np.diff(s) > 0).all() for s in shards)


def test_a_fixed_number_of_sensors_per_actor_is_never_exceeded():
    work = np.r_[np.full(5, 100.0), np.ones(15)]  # unfixed, the heavy sensors' actors would take few sensors
    assert sorted(len(s) for s in _placement(4).balanced_shards(work)) != [5, 5, 5, 5]
    assert [len(s) for s in _placement(4, per_actor=5).balanced_shards(work)] == [5, 5, 5, 5]


def test_skewed_work_is_balanced_far_better_than_contiguous_blocks():
    work = np.sort(np.random.default_rng(0).lognormal(0, 1, 400))  # sorted: blocks are as uneven as can be
    blocks = Placement(4, 100, 1, 0).shards(400)
    balanced = _placement(4).balanced_shards(work)
    assert sorted(len(s) for s in _placement(4).balanced_shards(np.ones(100))) == [25, 25, 25, 25]

    def spread(shards):
        return max(work[s].sum() for s in shards) / (work.sum() / len(shards))

    assert spread(balanced) < 1.01 and spread(blocks) > 1.5


def test_expected_work_counts_padded_batches():
    scenario = raysim.load_scenario({"name": "w", "training": {"batch_size": 16, "local_epochs": 2}})
    np.testing.assert_array_equal(expected_work(scenario, np.array([1, 16, 17, 64])), [32, 32, 64, 128])
    full = raysim.load_scenario({"name": "w", "training": {"batch_size": "full", "local_epochs": 3}})
    np.testing.assert_array_equal(expected_work(full, np.array([1, 17])), [3, 51])


# ---------------------------------------------------------------------- columnar shard reads (no Ray)


@pytest.fixture
def sample_file(tmp_path, monkeypatch):
    """Sensors 0..29 with 1-9 samples each, in row groups of 16 rows, so sensors straddle groups."""
    monkeypatch.setattr(store, "ROWS_PER_GROUP", 16)
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 10, size=30)
    sensor = np.repeat(np.arange(30) * 7, counts)  # ids with gaps
    x = rng.standard_normal((len(sensor), 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=len(sensor))
    chunks = [(sensor[i : i + 5], x[i : i + 5], y[i : i + 5]) for i in range(0, len(sensor), 5)]
    path = store.write_samples(tmp_path / "s.parquet", chunks, channels=2, window=3, classes=4)
    return path, sensor, x, y


def test_a_shard_holds_exactly_its_sensors_rows_in_file_order(sample_file):
    path, sensor, x, y = sample_file
    assert store._open(path).num_row_groups > 5
    wanted = [7, 70, 203, 0, 133]
    shard = store.read_shard(path, wanted)
    np.testing.assert_array_equal(shard.ids, sorted(wanted))
    assert shard.x.flags.c_contiguous and len(shard.x) == shard.counts.sum()
    for i, sid in enumerate(shard.ids):
        rows = sensor == sid
        got_x, got_y = shard.samples(int(sid))
        np.testing.assert_array_equal(got_x, x[rows])
        np.testing.assert_array_equal(got_y, y[rows])
        assert shard.counts[i] == rows.sum()
    np.testing.assert_array_equal(shard.index([203, 7]), [4, 1])
    with pytest.raises(KeyError):
        shard.index([8])


def test_row_groups_that_cannot_hold_a_sensor_are_skipped(sample_file):
    path, sensor, x, _ = sample_file
    pf = store._open(path)
    for sid in (0, 70, int(sensor.max())):
        groups = store._groups_that_may_hold(pf, np.array([sid]))
        assert 0 < len(groups) <= 2 < pf.num_row_groups  # a sensor's ≤ 9 rows span at most two groups of 16
        rows = np.concatenate([pf.read_row_group(g, columns=["sensor"]).column("sensor").to_numpy() for g in groups])
        assert (rows == sid).sum() == (sensor == sid).sum()  # and those groups hold all of its rows


def test_a_shard_asking_for_a_missing_sensor_names_it(sample_file):
    path, _, _, _ = sample_file
    with pytest.raises(DataError, match=r"s\.parquet: column 'sensor' has no rows for sensor ids 8$"):
        store.read_shard(path, [7, 8])


# ---------------------------------------------------------------------- runs (shared Ray session)


def tiny(**changes) -> dict:
    """40 sensors, all trained every round, two client actors."""
    return with_changes({
        "name": "tiny",
        "seed": 5,
        "fleet": {
            "sensors": 40,
            "data": {"kind": "synthetic", "samples_per_sensor": 20, "quantity_sigma": 0.6, "test_samples": 200,
                     "test_sensors": 5},
            "tiers": [{"name": "one", "share": 1.0, "seconds_per_sample": 0.001, "up_mbps": 5, "down_mbps": 5,
                       "latency_ms": 10}],
        },
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 3, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": 30},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    return raysim.run(tiny(), out_dir=tmp_path_factory.mktemp("scale") / "tiny")


CASES = {
    "fedavg": {},
    "fedprox-uniform-int8": {"aggregation.strategy": {"name": "fedprox", "mu": 0.1, "weighting": "uniform"},
                             "compression.uplink": {"name": "int8"}},
}


@pytest.mark.ray
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_sums_formed_on_the_actors_equal_the_coordinators_mean(ray_session, tmp_path, case):
    on_actors = raysim.run(tiny(**CASES[case]), out_dir=tmp_path / "actors")
    central = raysim.run(tiny(**CASES[case], **{"cluster.aggregate_on_actors": False}), out_dir=tmp_path / "central")
    assert on_actors.summary["aggregated_on_actors"] and not central.summary["aggregated_on_actors"]
    assert_same_run(on_actors, central, events_rtol=1e-5)
    assert on_actors.metrics["updates_applied"].to_pylist() == [30, 30, 30]


@pytest.mark.ray
def test_robust_aggregation_keeps_every_update_on_the_coordinator(tiny_run, tmp_path):
    median = raysim.run(tiny(**{"aggregation.aggregator": {"name": "median"}, "training.rounds": 1}),
                        out_dir=tmp_path / "median")
    assert tiny_run.summary["aggregated_on_actors"] and not median.summary["aggregated_on_actors"]


@pytest.mark.ray
def test_training_batches_and_shard_layout_change_nothing(tiny_run, tmp_path):
    other = raysim.run(tiny(**{"cluster.sensors_per_batch": 3, "cluster.balance": "contiguous",
                               "cluster.client_actors": 3}), out_dir=tmp_path / "batches")
    assert other.summary["client_actors"] == 3
    assert_same_run(other, tiny_run, events_rtol=1e-5)


@pytest.mark.ray
def test_actor_work_and_memory_are_reported(tiny_run):
    metrics = tiny_run.metrics.to_pydict()
    actors = pq.read_table(tiny_run.run_dir / "actors.parquet").to_pydict()
    for i, r in enumerate(metrics["round"]):
        rows = [j for j, ar in enumerate(actors["round"]) if ar == r]
        trained = metrics["updates_applied"][i] + metrics["updates_rejected"][i]
        assert sum(actors["sensors"][j] for j in rows) == trained == 30
        assert {actors["actor"][j] for j in rows} == {0, 1}
        busy = [actors["busy_s"][j] for j in rows]
        # Each actor's busy time lies inside the coordinator's send-to-last-result window.
        assert 0 < max(busy) == pytest.approx(metrics["actor_busy_max_s"][i])
        assert metrics["actor_busy_max_s"][i] <= metrics["train_wall_s"][i]
        assert metrics["actor_busy_mean_s"][i] == pytest.approx(sum(busy) / 2)
    memory = tiny_run.summary["memory"]
    assert len(memory["client_actors_peak_mb"]) == 2 and min(memory["client_actors_peak_mb"]) > 0
    assert memory["total_peak_mb"] == pytest.approx(
        memory["driver_peak_mb"] + memory["coordinator_peak_mb"] + sum(memory["client_actors_peak_mb"]))


MODELS_AND_ALGORITHMS = {
    "dscnn-scaffold": {"model": {"name": "dscnn", "channels": [4], "kernel_size": 3},
                       "aggregation.strategy": {"name": "scaffold"}},
    "mlp-fedprox-topk-ef": {"aggregation.strategy": {"name": "fedprox", "mu": 0.2},
                            "compression.uplink": {"name": "topk", "fraction": 0.2},
                            "compression.error_feedback": True, "training.momentum": 0.5},
}


@pytest.mark.ray
@pytest.mark.parametrize("case", MODELS_AND_ALGORITHMS, ids=list(MODELS_AND_ALGORITHMS))
def test_vectorized_and_reference_runs_agree(ray_session, tmp_path, case):
    changes = MODELS_AND_ALGORITHMS[case]
    fast = raysim.run(tiny(**changes), out_dir=tmp_path / "vectorized")
    slow = raysim.run(tiny(**changes, **{"training.vectorized": False}), out_dir=tmp_path / "reference")
    np.testing.assert_allclose(fast.global_weights, slow.global_weights, atol=2e-5)
    np.testing.assert_allclose(fast.metrics["train_loss"].to_numpy(), slow.metrics["train_loss"].to_numpy(),
                               rtol=1e-4)


@pytest.mark.ray
def test_a_run_on_reloaded_actors_is_the_run_on_new_ones(ray_session, tmp_path):
    from raysim import cluster

    def idle_pids():
        return sorted(ray_session.get([h.memory.remote() for _, h in cluster.ACTOR_POOL.idle])[i]["pid"]
                      for i in range(len(cluster.ACTOR_POOL.idle)))

    scaffold = tiny(**{"aggregation.strategy": {"name": "scaffold"}, "compression.uplink": {"name": "topk", "fraction": 0.3},
                       "compression.error_feedback": True})  # per-sensor state on the actors: controls, residuals
    cluster.release_idle()
    first = raysim.run(scaffold, out_dir=tmp_path / "first")
    pids = idle_pids()
    assert len(pids) == 3  # two client actors and the coordinator wait for the next run
    second = raysim.run(scaffold, out_dir=tmp_path / "second")
    assert idle_pids() == pids  # the same processes ran it
    assert_tables_identical(pq.read_table(second.run_dir / "events.parquet"),
                            pq.read_table(first.run_dir / "events.parquet"))
    np.testing.assert_array_equal(second.global_weights, first.global_weights)
    cluster.release_idle()
    assert cluster.ACTOR_POOL.idle == []

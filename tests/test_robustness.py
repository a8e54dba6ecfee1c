"""Strategies, server optimizers, attacks and update validation in whole runs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import raysim
from helpers import with_changes
from raysim.api import default_cache_dir
from raysim.attacks import choose_attackers
from raysim.client import ClientActor
from raysim.fleet import prepare_fleet

pytestmark = pytest.mark.ray


def scenario(**changes) -> raysim.Scenario:
    return raysim.load_scenario(with_changes({
        "name": "robust",
        "seed": 3,
        "fleet": {"sensors": 60, "data": {"samples_per_sensor": 16, "test_samples": 200, "test_sensors": 5}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 3, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": 16},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False},
    }, changes))


def events_of(result):
    return pq.read_table(result.run_dir / "events.parquet").to_pandas()


def malicious_ids(s: raysim.Scenario) -> set[int]:
    ids = prepare_fleet(s, default_cache_dir()).profiles.sensor_id
    return set(ids[choose_attackers(s.seed, ids, s.attack.fraction)].tolist())


MODES = {
    "sync": {},
    "sync-median": {"aggregation.aggregator": {"name": "median"}},
    "fedbuff-median": {"aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 12, "buffer_size": 4},
                                       "aggregator": {"name": "median"}}},
    "fedasync": {"aggregation": {"mode": "async", "strategy": {"name": "fedasync", "concurrency": 6}},
                 "training.rounds": 12},
}


@pytest.mark.parametrize("mode, value", [("sync", "nan"), ("sync-median", "inf"), ("fedbuff-median", "nan"),
                                         ("fedasync", "inf")])
def test_a_nan_sending_sensor_never_makes_the_global_model_non_finite(ray_session, tmp_path, mode, value):
    s = scenario(attack={"kind": "nan", "fraction": 0.25, "value": value}, **MODES[mode])
    run = raysim.run(s, out_dir=tmp_path / "run")
    assert np.isfinite(run.global_weights).all()
    events = events_of(run)
    trained = events[events.local_steps > 0]
    bad = trained.sensor.isin(malicious_ids(s))
    assert bad.any() and (~bad).any()
    # Every update a malicious sensor sent is rejected as non-finite; no honest one is.
    assert (trained[bad].outcome == "rejected").all() and (trained[bad].reason == "non_finite").all()
    assert (trained[~bad].reason != "non_finite").all()
    assert run.summary["updates_rejected"] == int((events.outcome == "rejected").sum())
    assert (run.metrics.column("updates_rejected").to_numpy() >= 0).all()


def test_label_flipping_attackers_train_on_flipped_labels(ray_session):
    s = scenario(attack={"kind": "label_flip", "fraction": 0.5})
    fleet = prepare_fleet(s, default_cache_dir())
    ids = fleet.profiles.sensor_id
    attacked = ClientActor(s, fleet, ids)
    clean = ClientActor(scenario(), fleet, ids)
    bad = malicious_ids(s)
    assert 0 < len(bad) < len(ids)
    for sid in ids.tolist():
        (_, y), (_, y_clean) = attacked.shard.samples(sid), clean.shard.samples(sid)
        expected = fleet.classes - 1 - y_clean if sid in bad else y_clean
        np.testing.assert_array_equal(y, expected)


def test_fedprox_without_proximal_term_behind_a_momentum_free_server_is_fedavg(ray_session, tmp_path):
    # Each half is also tested on its own: FedProx μ = 0 in tests/test_training.py, FedAvgM β = 0 in
    # tests/strategies/test_server_optimizers.py; this checks the pieces are wired together in a run.
    fedavg = raysim.run(scenario(), out_dir=tmp_path / "fedavg")
    both = raysim.run(scenario(**{"aggregation.strategy": {"name": "fedprox", "mu": 0.0},
                                  "aggregation.server_optimizer": {"name": "avgm", "momentum": 0.0, "lr": 1.0}}),
                      out_dir=tmp_path / "prox-avgm")
    np.testing.assert_allclose(both.global_weights, fedavg.global_weights, atol=1e-6)


def test_scaffold_sends_twice_the_bytes_and_checkpoints_its_control_and_the_optimizer_state(ray_session, tmp_path):
    run = raysim.run(scenario(**{"aggregation.strategy": {"name": "scaffold"},
                                 "aggregation.server_optimizer": {"name": "adam", "lr": 0.01}}),
                     out_dir=tmp_path / "scaffold")
    model_bytes = run.global_weights.nbytes
    events = events_of(run)
    delivered = events[events.outcome == "applied"]
    assert (delivered.bytes_up == 2 * model_bytes).all() and (delivered.bytes_down == 2 * model_bytes).all()
    state = np.load(run.run_dir / "checkpoints" / "final.npz")
    assert np.isfinite(state["strategy.control"]).all() and np.abs(state["strategy.control"]).sum() > 0
    assert np.isfinite(run.global_weights).all()
    assert int(state["optimizer.step"]) == 3
    assert state["optimizer.m"].shape == run.global_weights.shape and (state["optimizer.v"] > 0).all()


def test_norm_filter_rejects_boosted_updates_and_tensorboard_counts_them(ray_session, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = scenario(attack={"kind": "scale", "fraction": 0.1, "scale": 100},
                 **{"aggregation.validation": {"norm_zscore": 2.0}})
    run = raysim.run(s, out_dir=tmp_path / "run")
    events = events_of(run)
    outliers = events[events.reason == "norm_outlier"]
    assert len(outliers) > 0 and set(outliers.sensor) <= malicious_ids(s)
    board = EventAccumulator(str(run.run_dir / "tb")).Reload()
    counts = [e.value for e in board.Scalars("round/updates_rejected")]
    assert counts == run.metrics.column("updates_rejected").to_pylist()


def test_codecs_set_the_bytes_and_transfer_times_on_the_clock_both_ways(ray_session, tmp_path):
    """int8 up sends 8 bytes per parameter tensor plus one per weight, fp16 down two per weight; the clock charges that."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raysim.models import ParamLayout, build_model

    plain = raysim.run(scenario(), out_dir=tmp_path / "plain")
    coded = raysim.run(scenario(**{"compression.uplink": {"name": "int8"}, "compression.downlink": {"name": "fp16"}}),
                       out_dir=tmp_path / "coded")
    s = scenario()
    fleet = prepare_fleet(s, default_cache_dir())
    layout = ParamLayout.of(build_model(s.model, fleet.channels, fleet.window, fleet.classes))
    expected_up = 8 * len(layout.numels) + layout.size
    a, b = events_of(plain), events_of(coded)
    delivered = b[b.outcome == "applied"]
    assert (delivered.bytes_up == expected_up).all() and (a[a.outcome == "applied"].bytes_up == 4 * layout.size).all()
    assert (delivered.bytes_down == 2 * layout.size).all() and (a[a.outcome == "applied"].bytes_down == 4 * layout.size).all()
    # Same seed, same round-1 tasks: both transfers got shorter.
    first_a, first_b = a[a["round"] == 1].set_index("sensor"), b[b["round"] == 1].set_index("sensor")
    assert (first_b.upload_s < first_a.upload_s).all() and (first_b.download_s < first_a.download_s).all()
    # Sensors trained from the decoded fp16 model and said so: its fingerprint is the one the coordinator expects.
    assert coded.summary["updates_rejected"] == 0 and coded.summary["updates_applied"] == plain.summary["updates_applied"]
    assert coded.summary["uplink_compression"] == pytest.approx(4 * layout.size / expected_up)
    assert coded.summary["downlink_compression"] == pytest.approx(2.0)
    assert coded.metrics.column("uplink_compression").to_pylist() == [coded.summary["uplink_compression"]] * 3
    assert plain.metrics.column("downlink_compression").to_pylist() == [1.0] * 3
    assert np.isfinite(coded.global_weights).all() and not np.array_equal(coded.global_weights, plain.global_weights)
    board = EventAccumulator(str(coded.run_dir / "tb")).Reload()
    assert [e.value for e in board.Scalars("round/communication/cumulative_bytes_up")] == pytest.approx(
        coded.metrics.column("cumulative_bytes_up").to_pylist())
    by_bytes = board.Scalars("by_bytes_up/accuracy")
    assert [e.step for e in by_bytes] == coded.metrics.column("cumulative_bytes_up").to_pylist()


def test_a_codec_keeping_more_coordinates_than_the_model_has_is_a_scenario_error(tmp_path):
    with pytest.raises(raysim.ScenarioError, match=r"compression.uplink: topk keeps k=10000000 .* d="):
        raysim.run(scenario(**{"compression.uplink": {"name": "topk", "k": 10_000_000}}), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()

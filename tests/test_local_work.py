"""Adaptive local work: early stopping of local training and local epochs per tier, on the virtual clock."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import raysim
from helpers import with_changes
from raysim.cli import main
from raysim.models import MLPConfig, ParamLayout, build_model
from raysim.training import LocalTraining, _EarlyStop, train_reference, train_vectorized

SECONDS = {"fast": 0.001, "slow": 0.004}


def tier(name: str, share: float, **extra) -> dict:
    return {"name": name, "share": share, "seconds_per_sample": SECONDS[name], "up_mbps": 10, "down_mbps": 10,
            **extra}


def spec(**changes) -> dict:
    return with_changes({
        "name": "local-work",
        "seed": 2,
        "fleet": {"sensors": 40, "data": {"kind": "synthetic", "samples_per_sensor": 20, "test_samples": 100,
                                          "test_sensors": 4},
                  "tiers": [tier("fast", 0.5, local_epochs=4), tier("slow", 0.5)]},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 4, "local_epochs": 2, "batch_size": 6, "lr": 0.1},
        "aggregation": {"cohort": 12},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def test_a_sensor_stops_after_patience_epochs_without_improvement():
    stop = _EarlyStop(LocalTraining(epochs=9, batch_size=2, lr=0.1, patience=2, min_delta=0.1), np.array([2, 1]))
    # Sensor 0: 2 steps an epoch, epoch losses 1.0, 0.8 (better), 0.75 (< 0.1 better), 0.9: stops after epoch 4.
    # Sensor 1: 1 step an epoch, always 0.2 better: never stops.
    losses0 = [1.0, 1.0, 0.8, 0.8, 0.75, 0.75, 0.9, 0.9]
    for step in range(8):
        rows = np.flatnonzero(stop.alive)
        values = np.array([losses0[step], 2.0 - 0.2 * step])[rows]
        stop.after_step(step, rows, values)
        if step < 7:
            assert stop.alive[0]
    assert not stop.alive[0] and stop.alive[1]


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_vectorized_early_stopping_matches_the_reference(momentum):
    model = build_model(MLPConfig(hidden=(12,)), 3, 16, 4, seed=1)
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    rng = np.random.default_rng(0)
    sizes = [7, 30, 12, 4, 20]
    data = [(rng.normal(size=(n, 3, 16)).astype(np.float32), rng.integers(4, size=n)) for n in sizes]
    cfg = LocalTraining(epochs=6, batch_size=4, lr=0.3, patience=1, min_delta=0.15, momentum=momentum)
    plans = [cfg.plan(n, np.random.default_rng([1, i])) for i, n in enumerate(sizes)]
    fast = train_vectorized(model, layout, start, data, plans, cfg)
    slow = train_reference(model, layout, start, data, plans, cfg)
    np.testing.assert_array_equal(fast.steps, slow.steps)
    np.testing.assert_allclose(fast.updates, slow.updates, atol=2e-6)
    np.testing.assert_allclose(fast.train_loss, slow.train_loss, rtol=1e-6)
    assert (fast.steps <= [len(p) for p in plans]).all() and (fast.steps < [len(p) for p in plans]).any()


@pytest.mark.ray
def test_each_tier_trains_its_own_epochs_and_the_clock_follows(ray_session, tmp_path):
    run = raysim.run(spec(), out_dir=tmp_path / "run")
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    trained = events[events.outcome == "applied"]
    epochs = trained.tier.map({"fast": 4, "slow": 2})
    steps_per_epoch = np.ceil(trained.num_samples / 6)
    np.testing.assert_array_equal(trained.local_steps, epochs * steps_per_epoch)
    np.testing.assert_allclose(trained.compute_s, trained.num_samples * epochs * trained.tier.map(SECONDS), rtol=1e-9)


@pytest.mark.ray
def test_early_stopping_charges_only_the_steps_taken(ray_session, tmp_path):
    changes = {"training.early_stopping": {"patience": 1, "min_delta": 0.05}, "training.rounds": 6}
    run = raysim.run(spec(**changes), out_dir=tmp_path / "stopping")
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    trained = events[events.outcome == "applied"]
    epochs = trained.tier.map({"fast": 4, "slow": 2})
    steps_per_epoch = np.ceil(trained.num_samples / 6)
    assert (trained.local_steps <= epochs * steps_per_epoch).all()
    assert (trained.local_steps < epochs * steps_per_epoch).any()  # some did stop early
    seconds_per_step = trained.num_samples * trained.tier.map(SECONDS) / steps_per_epoch
    np.testing.assert_allclose(trained.compute_s, trained.local_steps * seconds_per_step, rtol=1e-9)
    # The round ends when its last update arrives, on the shortened clock.
    metrics = run.metrics.to_pandas()
    last = events.groupby("round").arrived_at.max().to_numpy()
    np.testing.assert_allclose(metrics.virtual_time_s, last, rtol=1e-12)


def test_early_stopping_needs_sync_mode(tmp_path, capsys):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(**{"training.early_stopping": {},
                                               "aggregation": {"mode": "async", "strategy": {"name": "fedbuff",
                                                                                             "concurrency": 8}}})))
    assert main(["validate", str(scenario)]) == 2
    assert "training.early_stopping needs aggregation.mode sync" in " ".join(capsys.readouterr().err.split())

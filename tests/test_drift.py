"""Drifting sensor data: calibration random walks and sudden faults."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import raysim
from helpers import with_changes
from raysim.attacks import attacker_count
from raysim.cli import main
from raysim.drift import DriftDetector, SensorDrift, faulty_sensors
from raysim.scenario import Drift, SensorFault


def spec(**changes) -> dict:
    return with_changes({
        "name": "drift", "seed": 4,
        "fleet": {"sensors": 40, "data": {"kind": "synthetic", "samples_per_sensor": 12, "test_samples": 100,
                                          "test_sensors": 4}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 6, "batch_size": 6, "lr": 0.1},
        "aggregation": {"cohort": 20},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def _windows(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(5, 3, 8)).astype(np.float32)


def test_no_drift_leaves_the_data_alone():
    drift = SensorDrift(Drift(), seed=1, fleet_ids=np.arange(10), channels=3)
    x = _windows()
    np.testing.assert_array_equal(drift.apply(3, 7, x), x)


def test_calibration_walks_grow_like_random_walks():
    drift = SensorDrift(Drift(gain_walk=0.1, offset_walk=0.2), seed=1, fleet_ids=np.arange(3000), channels=3)
    for r in (4, 16):
        gains, offsets = zip(*(drift.walks(sid, r) for sid in range(3000)))
        assert np.var(gains) == pytest.approx(r * 0.1 ** 2, rel=0.1)
        assert np.var(offsets) == pytest.approx(r * 0.2 ** 2, rel=0.1)
    # One walk: round r + 1 adds a single N(0, σ²) step to round r.
    steps = np.array([drift.walks(sid, 9)[0] - drift.walks(sid, 8)[0] for sid in range(3000)])
    assert np.var(steps) == pytest.approx(0.1 ** 2, rel=0.1)
    x = _windows()
    gain, offset = drift.walks(5, 3)
    np.testing.assert_allclose(drift.apply(5, 3, x), np.exp(gain)[None, :, None] * x + offset[None, :, None], rtol=1e-6)


@pytest.mark.parametrize("kind", ["stuck", "noisy"])
def test_faulty_sensors_fail_from_the_fault_round(kind):
    ids = np.arange(200)
    assert faulty_sensors(1, ids, 0.25).sum() == attacker_count(200, 0.25)
    drift = SensorDrift(Drift(fault=SensorFault(fraction=0.25, round=5, kind=kind, noise=2.0)), 1, ids, channels=3)
    faulty = sorted(drift.faulty)
    healthy = sorted(set(ids.tolist()) - drift.faulty)
    x = _windows()
    np.testing.assert_array_equal(drift.apply(faulty[0], 4, x), x)  # before the fault
    np.testing.assert_array_equal(drift.apply(healthy[0], 9, x), x)
    after = drift.apply(faulty[0], 5, x)
    if kind == "stuck":
        np.testing.assert_array_equal(after, np.broadcast_to(x[:1, :, :1], x.shape))
    else:
        assert np.std(after - x) == pytest.approx(2.0, rel=0.25)


@pytest.mark.ray
def test_a_run_is_unchanged_until_the_fault_and_not_after(ray_session, tmp_path):
    clean = raysim.run(spec(), out_dir=tmp_path / "clean")
    failing = raysim.run(spec(drift={"fault": {"fraction": 0.5, "round": 4, "kind": "stuck"}}),
                         out_dir=tmp_path / "failing")
    before, after = slice(0, 3), slice(3, 6)
    for column in ("train_loss", "accuracy"):
        a, b = clean.metrics[column].to_numpy(), failing.metrics[column].to_numpy()
        np.testing.assert_array_equal(a[before], b[before])
        assert not np.allclose(a[after], b[after])


def test_drift_needs_sync_mode(tmp_path, capsys):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(drift={}, aggregation={"mode": "async", "strategy": {
        "name": "fedbuff", "concurrency": 8}})))
    assert main(["validate", str(scenario)]) == 2
    assert "drift changes a sensor's data by round" in " ".join(capsys.readouterr().err.split())


@pytest.mark.ray
def test_detection_stays_quiet_on_a_stationary_fleet(ray_session, tmp_path):
    tests = alarms = 0
    for seed in (1, 2, 3):
        run = raysim.run(spec(seed=seed, drift={"detection": {"alpha": 0.05}}, **{"training.rounds": 15}),
                         out_dir=tmp_path / f"quiet{seed}")
        found = pq.read_table(run.run_dir / "drift.parquet").to_pandas()
        tests += len(found)
        alarms += int(found.alarm.sum())
        assert run.metrics["drift_alarms"].to_numpy().sum() == found.alarm.sum()
    assert tests > 500 and alarms / tests <= 0.08  # alpha 0.05, with room for sampling noise


@pytest.mark.ray
def test_detection_fires_at_a_faulty_sensors_first_report_after_the_fault(ray_session, tmp_path):
    run = raysim.run(spec(drift={"detection": {"alpha": 0.01}, "fault": {"fraction": 0.25, "round": 5}},
                          **{"training.rounds": 15}), out_dir=tmp_path / "fault")
    found = pq.read_table(run.run_dir / "drift.parquet").to_pandas()
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    faulty = set(np.flatnonzero(faulty_sensors(4, np.arange(40), 0.25)).tolist())
    first_report = events.groupby("sensor")["round"].min()
    checked = 0
    for sid in faulty:
        if first_report[sid] >= 5:
            continue  # its reference is already faulty: nothing to compare with
        after = found[(found.sensor == sid) & (found["round"] >= 5)]
        if len(after):
            assert after.alarm.all()  # every test after the fault, the first one included
            checked += 1
    assert checked >= 5
    healthy = found[~found.sensor.isin(faulty)]
    assert healthy.alarm.mean() <= 0.05
    # The report costs its bytes: C · samples float32 values more per upload.
    clean = events[(events.outcome == "applied") & (events.retransmissions == 0)]
    d = run.global_weights.size
    assert (clean.bytes_up == 4 * d + 4 * 6 * 64).all()


def test_the_detector_keeps_its_references_in_its_state():
    detector = DriftDetector(alpha=0.01, channels=2)
    rng = np.random.default_rng(0)
    detector.observe(1, np.array([3, 4]), rng.normal(size=(2, 2 * 16)))
    again = DriftDetector(alpha=0.01, channels=2)
    again.load_state_dict(detector.state_dict())
    report = rng.normal(size=(1, 2 * 16)) + 5.0
    assert again.observe(2, np.array([3]), report) == detector.observe(2, np.array([3]), report) == 1


def test_the_class_prior_drifts_further_with_the_rounds():
    drift = SensorDrift(Drift(prior_walk=0.3), seed=2, fleet_ids=np.arange(400), channels=3)
    y = np.repeat(np.arange(4), 250)  # balanced
    x = np.zeros((1000, 3, 2), dtype=np.float32)

    def shift(r: int) -> float:  # mean total-variation distance from the balanced mix
        distances = []
        for sid in range(400):
            _, drawn = drift.resample(sid, r, x, y, 4)
            distances.append(0.5 * np.abs(np.bincount(drawn, minlength=4) / 1000 - 0.25).sum())
        return float(np.mean(distances))

    assert shift(0) < 0.03 < shift(2) < shift(10)
    still = SensorDrift(Drift(), seed=2, fleet_ids=np.arange(4), channels=3)
    same_x, same_y = still.resample(1, 10, x, y, 4)
    assert same_x is x and same_y is y

"""Invariants of the seeded synthetic sensor generator."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.fleet import synthetic
from raysim.scenario import FeatureSkew, SyntheticData

SMALL = SyntheticData(classes=4, channels=4, window=16, samples_per_sensor=40, test_sensors=5, test_samples=103)


def test_same_seed_gives_identical_arrays():
    x1, y1 = synthetic.sensor_samples(SMALL, 3, 17)
    x2, y2 = synthetic.sensor_samples(SMALL, 3, 17)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    t1, t2 = synthetic.test_set(SMALL, 3), synthetic.test_set(SMALL, 3)
    for a, b in zip(t1, t2):
        np.testing.assert_array_equal(a, b)


def test_different_seed_or_sensor_gives_different_data():
    x, _ = synthetic.sensor_samples(SMALL, 3, 17)
    other_seed, _ = synthetic.sensor_samples(SMALL, 4, 17)
    other_sensor, _ = synthetic.sensor_samples(SMALL, 3, 18)
    assert other_seed.shape != x.shape or not np.array_equal(other_seed, x)
    assert other_sensor.shape != x.shape or not np.array_equal(other_sensor, x)


def test_sensor_data_independent_of_which_other_sensors_are_generated():
    alone = synthetic.sensor_samples(SMALL, 5, 42)
    in_fleet = {i: (x, y) for i, x, y in synthetic.iter_sensors(SMALL, 5, [99, 3, 42, 7])}
    reversed_fleet = {i: (x, y) for i, x, y in synthetic.iter_sensors(SMALL, 5, range(50, 30, -1))}
    for got in (in_fleet[42], reversed_fleet[42]):
        np.testing.assert_array_equal(got[0], alone[0])
        np.testing.assert_array_equal(got[1], alone[1])
    counts = synthetic.num_samples(SMALL, 5, [42, 1, 2])
    assert counts[0] == len(alone[1])
    assert synthetic.num_samples(SMALL, 5, [42])[0] == counts[0]


def test_shapes_and_dtypes():
    x, y = synthetic.sensor_samples(SMALL, 0, 1)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (len(y), SMALL.channels, SMALL.window)
    assert y.min() >= 0 and y.max() < SMALL.classes
    assert np.isfinite(x).all()
    assert synthetic.num_samples(SMALL, 0, np.arange(3)).dtype == np.int64


def test_zero_quantity_sigma_gives_exact_counts():
    cfg = SMALL.model_copy(update={"quantity_sigma": 0.0, "samples_per_sensor": 37})
    counts = synthetic.num_samples(cfg, 1, np.arange(200))
    assert (counts == 37).all()
    assert len(synthetic.sensor_samples(cfg, 1, 5)[1]) == 37


def test_quantity_skew_median_and_spread():
    cfg = SMALL.model_copy(update={"quantity_sigma": 0.8, "samples_per_sensor": 100, "min_samples": 1})
    counts = synthetic.num_samples(cfg, 2, np.arange(4000))
    assert abs(np.median(counts) - 100) <= 6
    # lognormal σ: the log-counts' std should be close to σ
    assert abs(np.log(counts).std() - 0.8) < 0.05


def test_min_samples_floor():
    cfg = SMALL.model_copy(update={"quantity_sigma": 3.0, "samples_per_sensor": 10, "min_samples": 8})
    counts = synthetic.num_samples(cfg, 2, np.arange(500))
    assert counts.min() == 8


def _mean_max_share(alpha: float) -> float:
    cfg = SMALL.model_copy(update={"label_alpha": alpha, "classes": 6, "quantity_sigma": 0.0, "samples_per_sensor": 200})
    shares = []
    for _, _, y in synthetic.iter_sensors(cfg, 9, range(60)):
        shares.append(np.bincount(y, minlength=6).max() / len(y))
    return float(np.mean(shares))


def test_label_skew_small_alpha_concentrates_large_alpha_is_uniform():
    concentrated = _mean_max_share(0.05)
    uniform = _mean_max_share(1000.0)
    assert concentrated > 0.8
    assert uniform < 1 / 6 + 0.08  # sampling noise of 200 draws only


def test_tiny_alpha_still_gives_valid_proportions():
    cfg = SMALL.model_copy(update={"label_alpha": 1e-6})
    for sensor in range(20):
        p = synthetic.class_proportions(cfg, 0, sensor)
        assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-9


def test_feature_skew_changes_per_sensor_statistics():
    def channel_means_spread(skew: FeatureSkew) -> float:
        cfg = SMALL.model_copy(update={"feature_skew": skew, "label_alpha": 1000.0, "samples_per_sensor": 400, "quantity_sigma": 0.0})
        means = np.array([x.mean(axis=(0, 2)) for _, x, _ in synthetic.iter_sensors(cfg, 4, range(20))])
        return float(means.std(axis=0).mean())

    none = FeatureSkew(gain_sigma=0, bias_sigma=0, rotation_deg=0, noise_min=0.2, noise_max=0.2)
    strong = FeatureSkew(gain_sigma=0.3, bias_sigma=1.0, rotation_deg=30, noise_min=0.2, noise_max=0.2)
    assert channel_means_spread(strong) > 5 * channel_means_spread(none)


def test_bias_and_gain_are_per_channel_and_rotation_is_orthonormal():
    cfg = SMALL.model_copy(update={"channels": 7, "feature_skew": FeatureSkew(rotation_deg=25)})
    cal = synthetic.calibration(cfg, 0, 3)
    assert cal.gain.shape == (7,) and cal.bias.shape == (7,)
    assert cal.rotation.shape == (2, 3, 3)  # channel 6 is not in a full triple
    for r in cal.rotation:
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)


def test_test_set_is_class_balanced_and_from_unseen_sensors():
    x, y, sensor = synthetic.test_set(SMALL, 0)
    assert len(y) == SMALL.test_samples
    assert x.shape == (SMALL.test_samples, SMALL.channels, SMALL.window) and x.dtype == np.float32
    counts = np.bincount(y, minlength=SMALL.classes)
    assert counts.max() - counts.min() <= 1
    assert len(np.unique(sensor)) == SMALL.test_sensors
    # fleet sensors are 0 … fleet.sensors-1; test ids must never be among them
    assert sensor.min() >= synthetic.TEST_SENSOR_ID_BASE


def test_test_sensors_do_not_reuse_fleet_streams():
    x, y, sensor = synthetic.test_set(SMALL, 0)
    j = int(sensor[0] - synthetic.TEST_SENSOR_ID_BASE)
    first = x[sensor == sensor[0]]
    fleet_x, _ = synthetic.sensor_samples(SMALL, 0, j)
    k = min(len(first), len(fleet_x))
    assert not np.allclose(first[:k], fleet_x[:k])


def test_templates_depend_on_seed_only():
    a = synthetic.templates(SMALL, 11)
    b = synthetic.templates(SMALL.model_copy(update={"samples_per_sensor": 5, "label_alpha": 3.0}), 11)
    np.testing.assert_array_equal(a.frequency, b.frequency)
    c = synthetic.templates(SMALL, 12)
    assert not np.array_equal(a.frequency, c.frequency)


def test_default_task_is_learnable_but_not_trivial():
    # A linear least-squares classifier trained on fleet sensors, scored on unseen test sensors:
    # well above chance (1/6), far from perfect (an MLP reaches ~85-90 %).
    cfg = SyntheticData()
    parts = list(synthetic.iter_sensors(cfg, 0, range(300)))
    x = np.concatenate([p[1] for p in parts]).reshape(-1, cfg.channels * cfg.window)
    y = np.concatenate([p[2] for p in parts])
    xt, yt, _ = synthetic.test_set(cfg, 0)
    w = np.linalg.lstsq(np.c_[x, np.ones(len(x))], np.eye(cfg.classes)[y], rcond=None)[0]
    accuracy = ((np.c_[xt.reshape(len(xt), -1), np.ones(len(xt))] @ w).argmax(1) == yt).mean()
    assert 0.3 < accuracy < 0.9

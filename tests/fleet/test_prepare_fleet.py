"""prepare_fleet: the synthetic cache and the user's Parquet files."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysim.errors import DataError
from raysim.fleet import FleetData, prepare_fleet, read_all, read_sensors, synthetic
from raysim.scenario import Scenario

DATA = {"kind": "synthetic", "classes": 3, "channels": 3, "window": 8, "samples_per_sensor": 10,
        "test_sensors": 4, "test_samples": 30}


def _scenario(sensors=12, seed=1, data=None, base_dir="."):
    return Scenario(name="t", seed=seed, fleet={"sensors": sensors, "data": data or DATA}, aggregation={"cohort": 1},
                    base_dir=str(base_dir))


def test_synthetic_files_hold_the_generator_output(tmp_path):
    scenario = _scenario()
    fleet = prepare_fleet(scenario, tmp_path)
    assert isinstance(fleet, FleetData)
    assert (fleet.channels, fleet.window, fleet.classes) == (3, 8, 3)
    cfg = scenario.fleet.data
    np.testing.assert_array_equal(fleet.profiles.sensor_id, np.arange(12))
    np.testing.assert_array_equal(fleet.profiles.num_samples, synthetic.num_samples(cfg, 1, np.arange(12)))
    shard = read_sensors(fleet.train_path, [3, 11])
    for sensor in (3, 11):
        x, y = synthetic.sensor_samples(cfg, 1, sensor)
        np.testing.assert_array_equal(shard[sensor][0], x)
        np.testing.assert_array_equal(shard[sensor][1], y)
    tx, ty, ts = read_all(fleet.test_path)
    ex, ey, es = synthetic.test_set(cfg, 1)
    np.testing.assert_array_equal(tx, ex)
    np.testing.assert_array_equal(ty, ey)
    np.testing.assert_array_equal(ts, es)


def test_cache_is_reused_and_keyed_by_what_changes_the_data(tmp_path):
    first = prepare_fleet(_scenario(), tmp_path)
    stamp = first.train_path.stat().st_mtime_ns
    again = prepare_fleet(_scenario(), tmp_path)
    assert again.train_path == first.train_path
    assert again.train_path.stat().st_mtime_ns == stamp
    only_preprocess = prepare_fleet(_scenario(data={**DATA, "preprocess": {"zscore": True}}), tmp_path)
    assert only_preprocess.train_path == first.train_path
    assert prepare_fleet(_scenario(seed=2), tmp_path).train_path != first.train_path
    assert prepare_fleet(_scenario(sensors=13), tmp_path).train_path != first.train_path
    assert prepare_fleet(_scenario(data={**DATA, "label_alpha": 2.0}), tmp_path).train_path != first.train_path
    # no temp directories left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_damaged_cache_entry_is_regenerated(tmp_path):
    fleet = prepare_fleet(_scenario(), tmp_path)
    fleet.test_path.unlink()
    again = prepare_fleet(_scenario(), tmp_path)
    assert again.test_path.is_file()
    np.testing.assert_array_equal(read_all(again.test_path)[1], synthetic.test_set(_scenario().fleet.data, 1)[1])


def test_racing_preparations_agree(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(prepare_fleet(_scenario(sensors=40), tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.train_path for r in results}) == 1
    _, _, sensor = read_all(results[0].train_path)
    np.testing.assert_array_equal(np.unique(sensor), np.arange(40))
    assert len([p for p in tmp_path.iterdir()]) == 1


# ------------------------------------------------------------------ user Parquet


def _user_file(path, sensors, length=6, classes=3, metadata=None, seed=0):
    rng = np.random.default_rng(seed)
    sensor = np.repeat(np.array(sensors, dtype=np.int64), 3)
    table = pa.table({
        "sensor": sensor,
        "label": rng.integers(0, classes, len(sensor)),
        "x": pa.array(rng.standard_normal((len(sensor), length)).tolist(), pa.list_(pa.float32())),
    })
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


def _parquet_scenario(tmp_path, sensors, train="train.parquet", test="test.parquet"):
    return _scenario(sensors=sensors, data={"kind": "parquet", "path": train, "test_path": test}, base_dir=tmp_path)


def test_user_parquet_relative_paths_and_sorted_ids(tmp_path):
    _user_file(tmp_path / "train.parquet", [900, -5, 42], classes=3)
    _user_file(tmp_path / "test.parquet", [1, 2], classes=5, metadata={"raysim.classes": "5"})
    fleet = prepare_fleet(_parquet_scenario(tmp_path, 3), tmp_path / "cache")
    assert fleet.train_path == tmp_path / "train.parquet"
    assert (fleet.channels, fleet.window, fleet.classes) == (1, 6, 5)
    np.testing.assert_array_equal(fleet.profiles.sensor_id, [-5, 42, 900])
    np.testing.assert_array_equal(fleet.profiles.num_samples, [3, 3, 3])


def test_user_parquet_sensor_count_mismatch(tmp_path):
    _user_file(tmp_path / "train.parquet", [1, 2, 3])
    _user_file(tmp_path / "test.parquet", [1])
    with pytest.raises(DataError) as info:
        prepare_fleet(_parquet_scenario(tmp_path, 4), tmp_path / "cache")
    assert "fleet.sensors" in str(info.value)
    assert str(tmp_path / "train.parquet") in str(info.value)


def test_user_parquet_test_shape_mismatch(tmp_path):
    _user_file(tmp_path / "train.parquet", [1, 2])
    _user_file(tmp_path / "test.parquet", [1], length=5)
    with pytest.raises(DataError) as info:
        prepare_fleet(_parquet_scenario(tmp_path, 2), tmp_path / "cache")
    assert str(tmp_path / "test.parquet") in str(info.value) and "'x'" in str(info.value)


def test_user_parquet_missing_test_file(tmp_path):
    _user_file(tmp_path / "train.parquet", [1, 2])
    with pytest.raises(DataError, match="test.parquet"):
        prepare_fleet(_parquet_scenario(tmp_path, 2), tmp_path / "cache")

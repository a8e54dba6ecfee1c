"""Parquet sample files: exact round trips, filtered reads, and one clear DataError per malformed file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysim.errors import DataError
from raysim.fleet import store


def _samples(sensors=(0, 1, 2, 5), per_sensor=(3, 1, 4, 2), channels=2, window=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    sensor = np.repeat(np.array(sensors, dtype=np.int64), per_sensor)
    x = rng.standard_normal((len(sensor), channels, window)).astype(np.float32)
    y = rng.integers(0, classes, size=len(sensor))
    return sensor, x, y


def test_round_trip_is_exact(tmp_path):
    sensor, x, y = _samples()
    path = store.write_samples(tmp_path / "s.parquet", [(sensor, x, y)], channels=2, window=5, classes=3)
    gx, gy, gs = store.read_all(path)
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    np.testing.assert_array_equal(gs, sensor)
    assert gx.dtype == np.float32 and gy.dtype == np.int64 and gs.dtype == np.int64
    info = store.inspect(path)
    assert (info.channels, info.window, info.classes) == (2, 5, 3)
    np.testing.assert_array_equal(info.sensor_ids, [0, 1, 2, 5])
    np.testing.assert_array_equal(info.num_samples, [3, 1, 4, 2])


def test_written_schema(tmp_path):
    sensor, x, y = _samples()
    path = store.write_samples(tmp_path / "s.parquet", [(sensor, x, y)], channels=2, window=5, classes=3)
    sch = pq.read_schema(path)
    assert sch.field("sensor").type == pa.int64()
    assert sch.field("label").type == pa.int32()
    assert sch.field("x").type == pa.list_(pa.float32(), 10)
    assert sch.metadata[b"raysim.channels"] == b"2"
    assert sch.metadata[b"raysim.window"] == b"5"
    assert sch.metadata[b"raysim.classes"] == b"3"


def test_rows_are_row_major_channels_by_window(tmp_path):
    x = np.arange(2 * 3, dtype=np.float32).reshape(1, 2, 3)
    path = store.write_samples(tmp_path / "s.parquet", [(np.array([7]), x, np.array([0]))], 2, 3, 1)
    assert pq.read_table(path).column("x").to_pylist() == [[0, 1, 2, 3, 4, 5]]


def test_streamed_chunks_sorted_and_in_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROWS_PER_GROUP", 10)
    chunks = [_samples(sensors=(s,), per_sensor=(4,), seed=s) for s in range(12)]
    path = store.write_samples(tmp_path / "s.parquet", chunks, 2, 5, 3)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups > 1
    assert meta.num_rows == 48
    _, _, sensor = store.read_all(path)
    assert (np.diff(sensor) >= 0).all()


def test_out_of_order_chunks_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        store.write_samples(tmp_path / "s.parquet", [_samples(sensors=(5,), per_sensor=(1,)), _samples(sensors=(1,), per_sensor=(1,))], 2, 5, 3)
    assert not list(tmp_path.iterdir())  # no temp file and no partial output left behind


def test_read_sensors_returns_only_requested_and_keeps_row_order(tmp_path):
    sensor, x, y = _samples()
    path = store.write_samples(tmp_path / "s.parquet", [(sensor, x, y)], 2, 5, 3)
    got = store.read_sensors(path, [5, 0])
    assert sorted(got) == [0, 5]
    for sid in (0, 5):
        np.testing.assert_array_equal(got[sid][0], x[sensor == sid])
        np.testing.assert_array_equal(got[sid][1], y[sensor == sid])
    assert store.read_sensors(path, []) == {}


def test_read_sensors_unknown_id_is_a_data_error(tmp_path):
    sensor, x, y = _samples()
    path = store.write_samples(tmp_path / "s.parquet", [(sensor, x, y)], 2, 5, 3)
    with pytest.raises(DataError, match="sensor"):
        store.read_sensors(path, [0, 3])


def test_read_sensors_with_arbitrary_int64_ids(tmp_path):
    ids = (-(2**62), -3, 10**15)
    sensor, x, y = _samples(sensors=ids, per_sensor=(2, 2, 2))
    path = store.write_samples(tmp_path / "s.parquet", [(sensor, x, y)], 2, 5, 3)
    got = store.read_sensors(path, [10**15])
    np.testing.assert_array_equal(got[10**15][0], x[sensor == 10**15])
    np.testing.assert_array_equal(store.inspect(path).sensor_ids, sorted(ids))


def test_user_file_without_metadata_and_variable_length_lists(tmp_path):
    rows = [[float(i), float(i) + 0.5, 2.0] for i in range(4)]
    table = pa.table({"sensor": pa.array([3, 3, 1, 1], pa.int32()), "label": pa.array([0, 4, 2, 1], pa.int64()),
                      "x": pa.array(rows, pa.list_(pa.float64()))})
    path = tmp_path / "user.parquet"
    pq.write_table(table, path)
    info = store.inspect(path)
    assert (info.channels, info.window, info.classes) == (1, 3, 5)
    np.testing.assert_array_equal(info.sensor_ids, [1, 3])
    np.testing.assert_array_equal(info.num_samples, [2, 2])
    got = store.read_sensors(path, [3])
    np.testing.assert_array_equal(got[3][0], np.array(rows[:2], dtype=np.float32).reshape(2, 1, 3))
    np.testing.assert_array_equal(got[3][1], [0, 4])


def test_user_metadata_shapes_a_variable_length_list(tmp_path):
    table = pa.table({"sensor": [0, 0], "label": [0, 1], "x": pa.array([[0.0] * 6, [1.0] * 6], pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({"raysim.channels": "2", "raysim.classes": "4"})
    path = tmp_path / "user.parquet"
    pq.write_table(table, path)
    info = store.inspect(path)
    assert (info.channels, info.window, info.classes) == (2, 3, 4)
    x, _, _ = store.read_all(path)
    assert x.shape == (2, 2, 3)


# ------------------------------------------------------------------ malformed files


def _write(tmp_path, columns: dict, metadata: dict | None = None, name="bad.parquet"):
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    path = tmp_path / name
    pq.write_table(table, path)
    return path


GOOD_X = pa.array([[0.0, 1.0], [2.0, 3.0]], pa.list_(pa.float32(), 2))

MALFORMED = {
    "missing sensor": ({"label": [0, 1], "x": GOOD_X}, None, "sensor"),
    "missing label": ({"sensor": [0, 1], "x": GOOD_X}, None, "label"),
    "missing x": ({"sensor": [0, 1], "label": [0, 1]}, None, "x"),
    "float sensor": ({"sensor": [0.5, 1.0], "label": [0, 1], "x": GOOD_X}, None, "sensor"),
    "string label": ({"sensor": [0, 1], "label": ["a", "b"], "x": GOOD_X}, None, "label"),
    "float label": ({"sensor": [0, 1], "label": [0.0, 1.0], "x": GOOD_X}, None, "label"),
    "x not a list": ({"sensor": [0, 1], "label": [0, 1], "x": [0.1, 0.2]}, None, "x"),
    "x of strings": ({"sensor": [0, 1], "label": [0, 1], "x": [["a"], ["b"]]}, None, "x"),
    "variable lengths": ({"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, 1.0], [2.0]])}, None, "x"),
    "length vs metadata": (
        {"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, 1.0], [2.0, 3.0]])},
        {"raysim.channels": "1", "raysim.window": "3"},
        "x",
    ),
    "fixed length vs metadata": ({"sensor": [0, 1], "label": [0, 1], "x": GOOD_X}, {"raysim.channels": "2", "raysim.window": "2"}, "x"),
    "negative label": ({"sensor": [0, 1], "label": [0, -1], "x": GOOD_X}, None, "label"),
    "label above classes": ({"sensor": [0, 1], "label": [0, 3], "x": GOOD_X}, {"raysim.classes": "3"}, "label"),
    "nan feature": ({"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, 1.0], [float("nan"), 3.0]], pa.list_(pa.float32(), 2))}, None, "x"),
    "inf feature": ({"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, float("inf")], [1.0, 3.0]])}, None, "x"),
    "null label": ({"sensor": [0, 1], "label": pa.array([0, None], pa.int64()), "x": GOOD_X}, None, "label"),
    "null sensor": ({"sensor": pa.array([None, 1], pa.int64()), "label": [0, 1], "x": GOOD_X}, None, "sensor"),
    "null window": ({"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, 1.0], None])}, None, "x"),
    "null value in window": ({"sensor": [0, 1], "label": [0, 1], "x": pa.array([[0.0, 1.0], [None, 1.0]])}, None, "x"),
    "bad metadata": ({"sensor": [0, 1], "label": [0, 1], "x": GOOD_X}, {"raysim.window": "wide"}, "raysim.window"),
    "empty": (
        {"sensor": pa.array([], pa.int64()), "label": pa.array([], pa.int32()), "x": pa.array([], pa.list_(pa.float32(), 2))},
        None,
        "no rows",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_names_file_and_column(tmp_path, case):
    columns, metadata, expected = MALFORMED[case]
    path = _write(tmp_path, columns, metadata)
    with pytest.raises(DataError) as info:
        store.inspect(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_row_numbers_in_messages_count_from_file_start(tmp_path):
    rows = [[0.0, 1.0, 2.0]] * 17 + [[0.0, 1.0]]
    path = _write(tmp_path, {"sensor": [0] * 18, "label": [0] * 18, "x": pa.array(rows)})
    with pytest.raises(DataError, match=r"column 'x'.*row 17 has 2 values"):
        store.inspect(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="does not exist") as info:
        store.inspect(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError):
        store.read_all(path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text("sensor,label,x\n0,1,2\n")
    with pytest.raises(DataError, match="not a readable Parquet file") as info:
        store.inspect(path)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        store.inspect(tmp_path)

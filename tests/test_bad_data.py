"""A malformed user data file stops `raysim run` with a clear error, exit 2 and no run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from raysim.cli import main


def good_columns(sensors: int = 4, per_sensor: int = 5, length: int = 12) -> dict:
    rng = np.random.default_rng(0)
    rows = sensors * per_sensor
    return {
        "sensor": np.repeat(np.arange(sensors), per_sensor),
        "label": rng.integers(0, 3, rows),
        "x": [rng.normal(size=length).astype(np.float32).tolist() for _ in range(rows)],
    }


def scenario_for(tmp_path: Path, train: dict | None, test: dict | None = None, sensors: int = 4) -> Path:
    for name, columns in (("train.parquet", train), ("test.parquet", test or good_columns(2))):
        if columns is not None:
            pq.write_table(pa.table(columns), tmp_path / name)
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({
        "name": "user",
        "fleet": {"sensors": sensors, "data": {"kind": "parquet", "path": "train.parquet", "test_path": "test.parquet"}},
        "aggregation": {"cohort": 2},
        "training": {"rounds": 1},
        "logging": {"progress": False},
    }))
    return path


def _bad(columns_change) -> dict:
    columns = good_columns()
    columns_change(columns)
    return columns


def _ragged(c):
    c["x"][3] = c["x"][3][:-2]


def _nan(c):
    c["x"][5][0] = float("nan")


def _negative(c):
    c["label"][2] = -1


def _text_labels(c):
    c["label"] = [str(v) for v in c["label"]]


CASES = {
    "missing_x_column": (lambda: {k: v for k, v in good_columns().items() if k != "x"}, "train.parquet", "'x'"),
    "ragged_windows": (lambda: _bad(_ragged), "train.parquet", "'x'"),
    "nan_feature": (lambda: _bad(_nan), "train.parquet", "'x'"),
    "negative_label": (lambda: _bad(_negative), "train.parquet", "'label'"),
    "text_labels": (lambda: _bad(_text_labels), "train.parquet", "'label'"),
    "empty_file": (lambda: {k: v[:0] for k, v in good_columns().items()}, "train.parquet", ""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_training_file(case, tmp_path, capsys):
    make, file_name, column = CASES[case]
    scenario = scenario_for(tmp_path, make())
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysim: error:") and "Traceback" not in err
    assert file_name in err and column in err
    assert not out.exists()


def test_file_that_is_not_parquet(tmp_path, capsys):
    scenario = scenario_for(tmp_path, None)
    (tmp_path / "train.parquet").write_text("sensor,label,x\n1,2,3\n")
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.parquet" in err and "Parquet" in err
    assert not (tmp_path / "run").exists()


def test_missing_data_file(tmp_path, capsys):
    scenario = scenario_for(tmp_path, None)
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    assert "train.parquet" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sensor_count_must_match_scenario(tmp_path, capsys):
    scenario = scenario_for(tmp_path, good_columns(sensors=4), sensors=5)
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "fleet.sensors" in err and "train.parquet" in err
    assert not (tmp_path / "run").exists()


def test_test_file_with_other_window_length(tmp_path, capsys):
    scenario = scenario_for(tmp_path, good_columns(), test=good_columns(2, length=10))
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    assert "test.parquet" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def trace_scenario(tmp_path: Path, trace: str) -> Path:
    scenario = tmp_path / "trace.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "trace",
        "fleet": {"sensors": 10, "tiers": [{"name": "t", "share": 1, "seconds_per_sample": 0.001, "up_mbps": 1,
                                            "down_mbps": 1, "availability": {"kind": "trace", "path": trace}}]},
        "aggregation": {"cohort": 5},
        "logging": {"progress": False},
    }))
    return scenario


def test_missing_availability_trace_exits_2(tmp_path, capsys):
    scenario = trace_scenario(tmp_path, "nope.csv")
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "Traceback" not in err
    assert not out.exists()


def test_malformed_availability_trace_exits_2(tmp_path, capsys):
    (tmp_path / "trace.csv").write_text("sensor,start_s,end_s\n0,5,3\n")
    scenario = trace_scenario(tmp_path, "trace.csv")
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "trace.csv" in err and "end_s" in err
    assert not (tmp_path / "run").exists()

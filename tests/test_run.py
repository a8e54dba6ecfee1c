"""End-to-end runs on the shared Ray session: outputs, determinism, FedAvg correctness, placement, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import raysim
from helpers import assert_tables_identical, with_changes
from raysim.cli import main
from raysim.metrics import WALL_CLOCK_COLUMNS

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def small(**changes) -> dict:
    """A scenario small enough for a test: 60 sensors, 20 per round, two tiers of profiles."""
    return with_changes({
        "name": "small",
        "seed": 3,
        "fleet": {
            "sensors": 60,
            "data": {"kind": "synthetic", "samples_per_sensor": 24, "test_samples": 300, "test_sensors": 10},
            "tiers": [
                {"name": "fast", "share": 0.5, "seconds_per_sample": 0.001, "up_mbps": 20, "down_mbps": 50, "latency_ms": 10},
                {"name": "slow", "share": 0.5, "seconds_per_sample": 0.005, "up_mbps": 0.5, "down_mbps": 2,
                 "latency_ms": 150, "loss": 0.1},
            ],
        },
        "model": {"name": "mlp", "hidden": [16]},
        "training": {"rounds": 3, "batch_size": 8, "lr": 0.05},
        "aggregation": {"cohort": 20},
        "cluster": {"num_cpus": 0.5},
        "logging": {"progress": False},
    }, changes)


@pytest.fixture(scope="module")
def small_run(ray_session, tmp_path_factory):
    return raysim.run(small(), out_dir=tmp_path_factory.mktemp("runs") / "small")


def test_run_directory_has_every_output(small_run):
    run_dir = small_run.run_dir
    for name in ("scenario.yaml", "metrics.parquet", "events.parquet", "summary.json", "checkpoints/final.npz"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    resolved = raysim.load_scenario(run_dir / "scenario.yaml")
    assert resolved.to_dict() == raysim.load_scenario(small()).to_dict()


def test_metrics_and_events_are_consistent(small_run):
    metrics = small_run.metrics.to_pydict()
    events = pq.read_table(small_run.run_dir / "events.parquet").to_pydict()
    assert metrics["round"] == [1, 2, 3]
    assert len(events["sensor"]) == 3 * 20
    for r in (1, 2, 3):
        rows = [i for i, er in enumerate(events["round"]) if er == r]
        applied = sum(events["outcome"][i] == "applied" for i in rows)
        assert metrics["updates_applied"][r - 1] == applied
        assert metrics["updates_dropped"][r - 1] == 20 - applied
        assert metrics["bytes_up"][r - 1] == sum(events["bytes_up"][i] for i in rows)
        assert len({events["sensor"][i] for i in rows}) == 20  # a cohort has no repeats
        # wait-all: the round lasts until its last applied update arrives
        last = max(events["arrived_at"][i] for i in rows if events["outcome"][i] == "applied")
        assert metrics["virtual_time_s"][r - 1] == pytest.approx(last)
    assert set(events["outcome"]) <= {"applied", "lost"}
    assert np.all(np.diff(metrics["virtual_time_s"]) > 0)
    assert all(0 <= a <= 1 for a in metrics["accuracy"])
    d = small_run.global_weights.size
    assert metrics["bytes_down"][0] >= 20 * 4 * d  # every sensor downloads the float32 model at least once
    summary = json.loads((small_run.run_dir / "summary.json").read_text())
    assert summary == small_run.summary
    assert summary["updates_applied"] == sum(metrics["updates_applied"])
    assert summary["final_accuracy"] == metrics["accuracy"][-1]


def test_final_weights_match_checkpoint(small_run):
    saved = np.load(small_run.run_dir / "checkpoints" / "final.npz")
    np.testing.assert_array_equal(saved["weights"], small_run.global_weights)
    assert small_run.global_weights.dtype == np.float32


def test_tensorboard_curves_equal_metrics(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(small_run.run_dir / "tb")).Reload()
    metrics = small_run.metrics.to_pydict()
    for column, tag in (("accuracy", "round/accuracy"), ("loss", "round/loss"), ("bytes_up", "round/bytes_up"),
                        ("updates_applied", "round/updates_applied")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == metrics["round"]
        np.testing.assert_allclose([s.value for s in scalars], metrics[column], rtol=1e-6)
    by_time = events.Scalars("by_virtual_time_ms/accuracy")
    assert [s.step for s in by_time] == [round(v * 1000) for v in metrics["virtual_time_s"]]
    assert "round/throughput/updates_per_s" in events.Tags()["scalars"]


def _comparable(metrics: pa.Table) -> dict:
    return {k: v for k, v in metrics.to_pydict().items() if k not in WALL_CLOCK_COLUMNS}


def test_results_do_not_depend_on_client_actor_count(ray_session, tmp_path):
    runs = [
        raysim.run(small(**{"cluster.client_actors": n}), out_dir=tmp_path / f"actors-{n}")
        for n in (1, 2, 4)
    ]
    assert [r.summary["client_actors"] for r in runs] == [1, 2, 4]
    base_events = pq.read_table(runs[0].run_dir / "events.parquet")
    base_metrics = _comparable(runs[0].metrics)
    for other in runs[1:]:
        assert_tables_identical(pq.read_table(other.run_dir / "events.parquet"), base_events)
        metrics = _comparable(other.metrics)
        assert metrics.keys() == base_metrics.keys()
        for column, values in base_metrics.items():
            if isinstance(values[0], str):
                assert metrics[column] == values, column
            else:
                np.testing.assert_allclose(metrics[column], values, rtol=1e-6, atol=1e-6, err_msg=column)
        np.testing.assert_allclose(other.global_weights, runs[0].global_weights, atol=1e-6)


def test_vectorized_and_reference_training_agree_end_to_end(ray_session, tmp_path):
    fast = raysim.run(small(), out_dir=tmp_path / "vectorized")
    slow = raysim.run(small(**{"training.vectorized": False}), out_dir=tmp_path / "reference")
    np.testing.assert_allclose(fast.global_weights, slow.global_weights, atol=1e-5)
    np.testing.assert_allclose(fast.metrics["accuracy"].to_numpy(), slow.metrics["accuracy"].to_numpy(), atol=1e-3)


def test_one_sensor_full_batch_round_is_one_centralized_sgd_step(ray_session, tmp_path):
    from raysim.fleet import prepare_fleet, store
    from raysim.models import build_model, init_weights
    from raysim.api import default_cache_dir

    spec = small(**{"fleet.sensors": 1, "aggregation.cohort": 1, "training.rounds": 1,
                    "training.batch_size": "full", "training.lr": 0.3})
    spec["fleet"]["tiers"] = [{"name": "one", "share": 1, "seconds_per_sample": 0.001, "up_mbps": 1, "down_mbps": 1}]
    scenario = raysim.load_scenario(spec)
    result = raysim.run(scenario, out_dir=tmp_path / "one")

    fleet = prepare_fleet(scenario, default_cache_dir())
    (sensor,) = fleet.profiles.sensor_id
    x, y = store.read_sensors(fleet.train_path, [sensor])[int(sensor)]
    start = init_weights(scenario.model, fleet.channels, fleet.window, fleet.classes, scenario.seed)
    # The centralized step, written out with plain torch autograd.
    model = build_model(scenario.model, fleet.channels, fleet.window, fleet.classes)
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(start[offset:offset + p.numel()]).view_as(p))
            offset += p.numel()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = start - 0.3 * torch.cat([g.reshape(-1) for g in grads]).numpy()
    np.testing.assert_allclose(result.global_weights, expected, atol=1e-6)


def test_training_improves_accuracy_well_beyond_chance(ray_session, tmp_path):
    spec = small(**{"fleet.sensors": 300, "aggregation.cohort": 60, "training.rounds": 10, "model.hidden": [64],
                    "training.lr": 0.2, "fleet.data.preprocess": {"zscore": True}})
    result = raysim.run(spec, out_dir=tmp_path / "learns")
    accuracy = result.metrics["accuracy"].to_pylist()
    chance = 1 / 6
    assert accuracy[-1] > 2 * chance
    assert accuracy[-1] > accuracy[0] + 0.05


def test_fractional_gpus_pack_four_actors_per_gpu(ray_session):
    import ray

    from raysim import cluster
    from raysim.api import default_cache_dir
    from raysim.fleet import prepare_fleet

    scenario = raysim.load_scenario(small(**{"cluster.client_actors": 8, "cluster.num_cpus": 0.25,
                                             "cluster.num_gpus": 0.25, "fleet.sensors": 40}))
    placement = cluster.plan_placement(scenario, cluster.cluster_resources())
    assert placement.client_actors == 8
    fleet = prepare_fleet(scenario, default_cache_dir())
    actors = cluster.start_client_actors(scenario, fleet, placement, cluster.shard_sensors(scenario, fleet, placement))
    try:
        where = ray.get([a.placement.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    gpu_ids = [w["gpu_ids"] for w in where]
    assert all(len(ids) == 1 for ids in gpu_ids)
    per_gpu = {}
    for (gpu,) in gpu_ids:
        per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    assert sorted(per_gpu.values()) == [4, 4]
    assert sum(w["sensors"] for w in where) == 40


def test_placement_beyond_cluster_is_a_clear_error(ray_session):
    from raysim import ClusterError, cluster

    scenario = raysim.load_scenario(small(**{"cluster.client_actors": 3, "cluster.num_gpus": 1}))
    with pytest.raises(ClusterError, match="GPUs"):
        cluster.plan_placement(scenario, cluster.cluster_resources())


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_run_against_existing_cluster_and_report(ray_session, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    scenario = _write_yaml(tmp_path / "s.yaml", small())
    out = tmp_path / "cli-run"
    done = subprocess.run(
        [sys.executable, "-m", "raysim.cli", "run", str(scenario), "--out", str(out), "--address", address,
         "--set", "training.rounds=2"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out / "metrics.parquet").num_rows == 2
    report = subprocess.run([sys.executable, "-m", "raysim.cli", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "accuracy" in report.stdout and "per round" in report.stdout


def test_existing_run_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    scenario = _write_yaml(tmp_path / "s.yaml", small())
    assert main(["run", str(scenario), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_impossible_placement_exits_2_and_leaves_no_run_directory(ray_session, tmp_path, capsys):
    scenario = _write_yaml(tmp_path / "s.yaml", small(**{"cluster.num_cpus": 2, "cluster.client_actors": 2}))
    out = tmp_path / "never"
    assert main(["run", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml" in err and "num_cpus" in err and "Traceback" not in err
    assert not out.exists()


def test_users_own_parquet_fleet_runs_end_to_end(ray_session, tmp_path):
    from raysim.fleet import store

    rng = np.random.default_rng(1)
    channels, window, classes = 3, 16, 4

    def chunk(sensor_ids, per_sensor):
        y = rng.integers(0, classes, len(sensor_ids) * per_sensor)
        x = rng.normal(size=(len(y), channels, window)).astype(np.float32) + y[:, None, None]
        return np.repeat(sensor_ids, per_sensor), x, y

    ids = np.array([-5, 3, 17, 40, 41, 99, 1000, 2**40], dtype=np.int64)  # any int64 ids
    store.write_samples(tmp_path / "train.parquet", [chunk(ids, 10)], channels, window, classes)
    store.write_samples(tmp_path / "test.parquet", [chunk(np.array([7]), 40)], channels, window, classes)
    scenario = _write_yaml(tmp_path / "mine.yaml", {
        "name": "mine",
        "fleet": {"sensors": len(ids), "data": {"kind": "parquet", "path": "train.parquet", "test_path": "test.parquet",
                                               "preprocess": {"smoothing_window": 3}}},
        "model": {"name": "dscnn", "channels": [8], "kernel_size": 3},
        "aggregation": {"cohort": 4},
        "training": {"rounds": 2, "batch_size": 4},
        "cluster": {"num_cpus": 0.5},
        "logging": {"progress": False},
    })
    result = raysim.run(scenario, out_dir=tmp_path / "run")
    events = pq.read_table(result.run_dir / "events.parquet").to_pydict()
    assert set(events["sensor"]) <= set(ids.tolist())
    assert result.metrics.num_rows == 2
    assert result.summary["model"] == "dscnn"
    assert 0 <= result.summary["final_accuracy"] <= 1

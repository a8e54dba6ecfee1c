"""Checkpoints and ``--resume``: a run killed mid-way and resumed ends exactly as if never stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import raysim
from helpers import assert_same_run, with_changes
from helpers import round_of as _round_of, start_run as _start, stop_at_round as _stop_at_round
from raysim.cli import main
from raysim.privacy import Privacy, RunAccountant

ROUNDS = 120


def spec(**changes) -> dict:
    """SCAFFOLD with error-feedback top-k, 12 of 40 sensors a round: per-sensor state that a resume must restore."""
    return with_changes({
        "name": "resumable",
        "seed": 4,
        "fleet": {"sensors": 40, "data": {"kind": "synthetic", "samples_per_sensor": 12, "test_samples": 100,
                                          "test_sensors": 4}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": ROUNDS, "batch_size": 6, "lr": 0.1},
        "aggregation": {"cohort": 12, "strategy": {"name": "scaffold"}, "server_optimizer": {"name": "adam", "lr": 0.01}},
        "compression": {"uplink": {"name": "topk", "fraction": 0.3}, "error_feedback": True},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "checkpoint": {"every": 3},
        "logging": {"progress": False, "eval_every": 10},
    }, changes)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    return raysim.run(spec(), out_dir=tmp_path_factory.mktemp("resume") / "whole")


@pytest.mark.ray
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, sig):
    scenario_file = tmp_path / "s.yaml"
    scenario_file.write_text(yaml.safe_dump(spec()))
    run_dir = tmp_path / "stopped"
    code, err = _stop_at_round(_start(scenario_file, run_dir), run_dir, at_least=6, sig=sig)
    saved = _round_of(run_dir / "checkpoints" / "latest.npz")
    assert 6 <= saved < ROUNDS
    if sig == signal.SIGINT:  # Ctrl-C: a last checkpoint, and the way to continue
        assert code == 130 and f"raysim run --resume {run_dir}" in err and f"round {saved} is saved" in err
    else:
        assert code == -signal.SIGKILL
    kept = pq.read_table(run_dir / "metrics.parquet")["round"].to_pylist()
    assert kept[-1] >= saved - 3  # written with every checkpoint
    resumed = raysim.run(None, resume=run_dir)
    assert resumed.metrics["round"].to_pylist() == list(range(1, ROUNDS + 1))
    assert_same_run(resumed, uninterrupted)
    tb = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert len(tb) == 1  # rebuilt on resume: no round twice


ASYNC = {"aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 10, "buffer_size": 4},
                         "server_optimizer": {"name": "adam", "lr": 0.01}}}


@pytest.mark.ray
def test_an_async_run_killed_mid_way_resumes_to_the_uninterrupted_result(ray_session, tmp_path):
    # FedBuff with error-feedback top-k: the schedule (tasks in flight, the dispatch generator) and each
    # sensor's residual must both come back.
    whole = raysim.run(spec(**ASYNC), out_dir=tmp_path / "whole")
    scenario_file = tmp_path / "s.yaml"
    scenario_file.write_text(yaml.safe_dump(spec(**ASYNC)))
    run_dir = tmp_path / "stopped"
    code, _ = _stop_at_round(_start(scenario_file, run_dir), run_dir, at_least=6, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL and 6 <= _round_of(run_dir / "checkpoints" / "latest.npz") < ROUNDS
    assert_same_run(raysim.run(None, resume=run_dir), whole)


@pytest.mark.ray
def test_resuming_a_finished_run_changes_nothing(uninterrupted):
    again = raysim.run(None, resume=uninterrupted.run_dir)
    assert_same_run(again, uninterrupted)


def test_bad_resumes_are_one_paragraph_and_status_2(tmp_path, capsys):
    def said() -> str:
        err = capsys.readouterr().err
        assert err.startswith("raysim: error:") and "Traceback" not in err
        return " ".join(err.split())

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", "--resume", str(empty)]) == 2
    assert "not a run directory (it has no scenario.yaml)" in said()
    (empty / "scenario.yaml").write_text(raysim.load_scenario(spec()).to_yaml())
    assert main(["run", "--resume", str(empty)]) == 2
    assert "has no checkpoint yet" in said()
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(spec(**{"seed": 5})))
    (empty / "checkpoints").mkdir()
    (empty / "checkpoints" / "latest.npz").write_bytes(b"")
    assert main(["run", str(other), "--resume", str(empty)]) == 2
    assert "differs from the run's own" in said()
    assert main(["run", "--resume", str(empty), "--set", "training.rounds=3"]) == 2
    assert "--set cannot change it" in said()
    assert main(["run"]) == 2
    assert "needs a SCENARIO file, or --resume" in said()


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_privacy_accountant_resumes_where_it_stopped(mode):
    config = Privacy(mode=mode, noise_multiplier=1.1, clip_norm=1.0, target_epsilon=3.0, on_budget="warn")
    first = RunAccountant(config, fleet_size=30)
    for step, q in enumerate([0.1, 0.1, 0.2, 0.1], start=1):
        first.charge(np.arange(step, step + 5), q, step)
    second = RunAccountant(config, fleet_size=30)
    second.load_state_dict({k: np.asarray(v) for k, v in first.state_dict().items()})
    assert second.spent == pytest.approx(first.spent, rel=1e-12) and second.spent > 0
    assert second.over_budget_at == first.over_budget_at
    for accountant in (first, second):
        accountant.charge(np.arange(10, 20), 0.2, 5)
    assert second.spent == pytest.approx(first.spent, rel=1e-12)

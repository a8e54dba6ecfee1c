"""Injected faults: a client actor killed mid-round or too slow to answer is replaced, and the run's
results are those of the undisturbed run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import raysim
from helpers import assert_tables_identical, with_changes
from raysim.metrics import WALL_CLOCK_COLUMNS

pytestmark = pytest.mark.ray


def spec(**changes) -> dict:
    return with_changes({
        "name": "faulty",
        "seed": 6,
        "fleet": {"sensors": 48, "data": {"kind": "synthetic", "samples_per_sensor": 16, "test_samples": 120,
                                          "test_sensors": 4}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 5, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": 24},
        "cluster": {"num_cpus": 0.5, "client_actors": 4},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


@pytest.fixture(scope="module")
def undisturbed(ray_session, tmp_path_factory):
    return raysim.run(spec(), out_dir=tmp_path_factory.mktemp("faults") / "calm")


def _same_run(run, calm) -> None:
    assert run.metrics["round"].to_pylist() == calm.metrics["round"].to_pylist()  # no round missing or repeated
    for column in calm.metrics.column_names:
        ours, theirs = run.metrics[column].to_pylist(), calm.metrics[column].to_pylist()
        if isinstance(theirs[0], str):
            assert ours == theirs, column
        elif column not in WALL_CLOCK_COLUMNS:
            assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6, nan_ok=True), column
    assert_tables_identical(pq.read_table(run.run_dir / "events.parquet"),
                            pq.read_table(calm.run_dir / "events.parquet"))
    np.testing.assert_allclose(run.global_weights, calm.global_weights, atol=1e-6)


def test_a_quarter_of_the_actors_killed_mid_round_changes_nothing(undisturbed, tmp_path):
    run = raysim.run(spec(faults=[{"kind": "kill_actor", "round": 3, "actors": [2]}]), out_dir=tmp_path / "killed")
    assert run.summary["actors_replaced"] == [{"step": 3, "actor": 2, "reason": "died"}]
    assert undisturbed.summary["actors_replaced"] == []
    _same_run(run, undisturbed)


def test_an_actor_that_does_not_answer_in_time_is_replaced(undisturbed, tmp_path):
    slow = spec(**{"faults": [{"kind": "slow_actor", "round": 2, "actors": [1], "seconds": 120}],
                   "cluster.call_timeout_s": 3})
    run = raysim.run(slow, out_dir=tmp_path / "slow")
    assert run.summary["actors_replaced"] == [{"step": 2, "actor": 1, "reason": "timed out"}]
    _same_run(run, undisturbed)


def test_a_short_delay_is_waited_for(undisturbed, tmp_path):
    run = raysim.run(spec(faults=[{"kind": "slow_actor", "round": 4, "actors": [0, 3], "seconds": 0.5}]),
                     out_dir=tmp_path / "delayed")
    assert run.summary["actors_replaced"] == []  # a straggling actor within the timeout is simply waited for
    _same_run(run, undisturbed)

"""Injected faults: a client actor killed mid-round or too slow to answer is replaced, and the run's
results are those of the undisturbed run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import raysim
from helpers import assert_same_run, assert_tables_identical, with_changes

pytestmark = pytest.mark.ray


def spec(**changes) -> dict:
    return with_changes({
        "name": "faulty",
        "seed": 6,
        "fleet": {"sensors": 48, "data": {"kind": "synthetic", "samples_per_sensor": 16, "test_samples": 120,
                                          "test_sensors": 4}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 5, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": 48},  # every actor trains every round, so a fault hits a call under way
        "cluster": {"num_cpus": 0.5, "client_actors": 4},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


@pytest.fixture(scope="module")
def undisturbed(ray_session, tmp_path_factory):
    return raysim.run(spec(), out_dir=tmp_path_factory.mktemp("faults") / "calm")


def test_a_quarter_of_the_actors_killed_mid_round_changes_nothing(undisturbed, tmp_path):
    run = raysim.run(spec(faults=[{"kind": "kill_actor", "round": 3, "actors": [2]}]), out_dir=tmp_path / "killed")
    assert run.summary["actors_replaced"] == [{"step": 3, "actor": 2, "reason": "died"}]
    assert undisturbed.summary["actors_replaced"] == []
    assert_same_run(run, undisturbed)


def test_an_actor_that_does_not_answer_in_time_is_replaced(undisturbed, tmp_path):
    slow = spec(**{"faults": [{"kind": "slow_actor", "round": 2, "actors": [1], "seconds": 120}],
                   "cluster.call_timeout_s": 3})
    run = raysim.run(slow, out_dir=tmp_path / "slow")
    assert run.summary["actors_replaced"] == [{"step": 2, "actor": 1, "reason": "timed out"}]
    assert_same_run(run, undisturbed)


def test_a_short_delay_is_waited_for_and_faults_can_come_at_a_virtual_time(undisturbed, tmp_path):
    second_round_starts = undisturbed.metrics["virtual_time_s"].to_pylist()[0]
    run = raysim.run(spec(faults=[{"kind": "slow_actor", "round": 4, "actors": [0, 3], "seconds": 0.5},
                                  {"kind": "kill_actor", "at_s": second_round_starts, "actors": [3]}]),
                     out_dir=tmp_path / "delayed")
    # A straggling actor within the timeout is simply waited for; the kill comes with round 2, the first to
    # start at that virtual time.
    assert run.summary["actors_replaced"] == [{"step": 2, "actor": 3, "reason": "died"}]
    assert_same_run(run, undisturbed)


def test_a_fault_needs_exactly_one_moment():
    for moment in ({}, {"round": 2, "at_s": 1.0}):
        with pytest.raises(raysim.ScenarioError, match="faults.0.*exactly one"):
            raysim.load_scenario(spec(faults=[{"kind": "kill_actor", **moment}]))


NODE_LOSS = """
import json, sys, threading, time
import numpy as np
import ray
from ray.cluster_utils import Cluster
import raysim

spec, out = json.loads(sys.argv[1]), sys.argv[2]
# Two nodes: the head (driver and coordinator) and one worker; the head has room for every actor on its own.
nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
try:
    workers = [nodes.add_node(num_cpus=2)]
    ray.init(address=nodes.address, logging_level="ERROR")
    nodes.wait_for_nodes()
    removed = {}

    def remove_a_node_once_round_2_is_saved():
        checkpoint = f"{out}/checkpoints/latest.npz"
        while True:
            try:
                with np.load(checkpoint) as saved:
                    if int(saved["round"]) >= 2:
                        break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        with open(f"{out}/placement.json") as handle:
            used = {a["node_id"] for a in json.load(handle)["actors"]}
        victim = next(n for n in workers if n.node_id in used)
        removed["node"] = victim.node_id
        nodes.remove_node(victim)

    watcher = threading.Thread(target=remove_a_node_once_round_2_is_saved, daemon=True)
    watcher.start()
    result = raysim.run(spec, out_dir=out)
    print(json.dumps({"removed": removed.get("node"), "replaced": result.summary["actors_replaced"],
                      "nodes": result.summary["nodes"]}))
finally:
    ray.shutdown()
    nodes.shutdown()
"""


def test_a_run_survives_losing_a_node(undisturbed, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # Long enough that many rounds remain when the node goes; compared with the same run undisturbed.
    spread = spec(**{"training.rounds": 150, "checkpoint.every": 1})
    out = tmp_path / "node-loss"
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, json.dumps(spread), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 2 and report["removed"] is not None  # spread: the lost node hosted actors
    lost = {a["actor"] for a in json.loads((out / "placement.json").read_text())["actors"]
            if a["node_id"] == report["removed"]}
    assert lost and {r["actor"] for r in report["replaced"]} == lost
    metrics = pq.read_table(out / "metrics.parquet")
    assert metrics["round"].to_pylist() == list(range(1, 151))
    calm = raysim.run(spread, out_dir=tmp_path / "calm-150")
    np.testing.assert_allclose(np.load(out / "checkpoints" / "final.npz")["weights"], calm.global_weights, atol=1e-6)
    assert_tables_identical(pq.read_table(out / "events.parquet"), pq.read_table(calm.run_dir / "events.parquet"))

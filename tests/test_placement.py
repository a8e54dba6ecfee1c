"""Where client actors go: custom resources, spreading over nodes, and the placement a run records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import raysim
from helpers import with_changes
from raysim import ClusterError, cluster

ROOT = Path(__file__).resolve().parents[1]


def spec(**changes) -> dict:
    return with_changes({
        "name": "placed",
        "seed": 2,
        "fleet": {"sensors": 24, "data": {"kind": "synthetic", "samples_per_sensor": 16, "test_samples": 120,
                                          "test_sensors": 4}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 2, "batch_size": 8},
        "aggregation": {"cohort": 12},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def test_custom_resources_the_cluster_lacks_are_a_clear_error():
    scenario = raysim.load_scenario(spec(**{"cluster.resources": {"sensor_host": 0.5}, "cluster.client_actors": 4}))
    with pytest.raises(ClusterError, match=r"cluster\.resources\.sensor_host: 4 client actors × 0\.5 = 2 .* has 0 "
                                           r"\(no node declares it"):
        cluster.plan_placement(scenario, {"CPU": 8})
    with pytest.raises(ClusterError, match=r"has 1\. Lower the share"):
        cluster.plan_placement(scenario, {"CPU": 8, "sensor_host": 1})
    placement = cluster.plan_placement(scenario, {"CPU": 8, "sensor_host": 2})
    assert placement.actor_options() == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"sensor_host": 0.5},
                                         "scheduling_strategy": "SPREAD"}
    packed = cluster.plan_placement(raysim.load_scenario(spec(**{"cluster.scheduling": "default"})), {"CPU": 8})
    assert "scheduling_strategy" not in packed.actor_options() and "resources" not in packed.actor_options()


@pytest.mark.ray
def test_a_run_records_where_its_actors_ran(ray_session, tmp_path):
    result = raysim.run(spec(), out_dir=tmp_path / "run")
    placement = json.loads((result.run_dir / "placement.json").read_text())
    node = ray_session.get_runtime_context().get_node_id()
    assert placement["nodes"] == [node] and result.summary["nodes"] == 1
    assert placement["per_actor"] == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {}}
    assert [a["actor"] for a in placement["actors"]] == [0, 1]
    assert sum(a["sensors"] for a in placement["actors"]) == 24
    assert all(a["node_id"] == node and a["gpu_ids"] == [] for a in placement["actors"])


MULTI_NODE = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    import raysim

    spec, out = json.loads(sys.argv[1]), sys.argv[2]
    # A head that hosts no client actor (it lacks the custom resource) and two GPU nodes that declare it.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1, num_gpus=1, resources={"sensor_host": 1})
        ray.init(address=nodes.address, logging_level="ERROR")
        nodes.wait_for_nodes()
        result = raysim.run(spec, out_dir=out)
        print(json.dumps({"summary_nodes": result.summary["nodes"],
                          "head": ray.get_runtime_context().get_node_id()}))
    finally:
        ray.shutdown()
        nodes.shutdown()
""")


@pytest.mark.ray
def test_actors_spread_over_nodes_with_the_custom_resource_and_fractional_gpus(tmp_path):
    # A multi-node Ray (ray.cluster_utils.Cluster) needs its own driver process: this one holds the shared session.
    # Each node could take all four actors (a quarter GPU and a quarter of the resource each): spreading splits them.
    placed = spec(**{"cluster.client_actors": 4, "cluster.num_cpus": 0.25, "cluster.num_gpus": 0.25,
                     "cluster.resources": {"sensor_host": 0.25}})
    out = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", MULTI_NODE, json.dumps(placed), str(out)], capture_output=True,
                          text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    placement = json.loads((out / "placement.json").read_text())
    by_node: dict[str, list[dict]] = {}
    for actor in placement["actors"]:
        by_node.setdefault(actor["node_id"], []).append(actor)
    assert len(by_node) == 2 == reported["summary_nodes"] and reported["head"] not in by_node
    for actors in by_node.values():  # two quarter-GPU actors share each node's one GPU
        assert len(actors) == 2 and [a["gpu_ids"] for a in actors] == [["0"], ["0"]]
    assert placement["per_actor"]["resources"] == {"sensor_host": 0.25}
    assert sum(a["sensors"] for a in placement["actors"]) == 24


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "could not reach the Ray cluster at '127.0.0.1:1': nothing answered at 127.0.0.1:1"),
    ("ray://127.0.0.1:1", "could not reach the Ray cluster at 'ray://127.0.0.1:1'"),
    ("head-without-port", "expected auto, HOST:PORT"),
])
def test_an_address_nothing_answers_at_is_one_paragraph_and_status_2(tmp_path, address, says):
    # A fresh process: this one may already hold the shared Ray session, which raysim.run would use as it is.
    done = subprocess.run([sys.executable, "-m", "raysim.cli", "run", str(ROOT / "scenarios" / "quickstart.yaml"),
                           "--address", address, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert says in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()

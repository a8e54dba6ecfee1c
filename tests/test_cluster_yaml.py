"""cluster.yaml (Ray cluster launcher) and examples/kuberay-rayjob.yaml stay valid and usable.

cluster.yaml is checked the way `ray up` checks it: Ray's own ``prepare_config`` (fills in the
AWS defaults) then ``validate_config`` (the jsonschema of ``ray/autoscaler/ray-schema.json``
shipped with the installed Ray, plus its cross-field checks). No Ray instance is started and
nothing reaches AWS.
"""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "examples" / "kuberay-rayjob.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CUSTOM_RESOURCE = "sensor_host"  # the name scenarios use in cluster.resources


def ray_up_validate(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill in the provider defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def gpu_worker_types(config: dict) -> dict:
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"] and node.get("resources", {}).get("GPU", 0) >= 1}


# --- cluster.yaml ---------------------------------------------------------------------------

def test_cluster_yaml_is_valid_for_ray_up(cluster):
    ray_up_validate(cluster)


def test_cluster_yaml_as_written_matches_ray_schema(cluster):
    # The file itself, before defaults are merged in: no unknown keys, right types.
    jsonschema.validate(cluster, json.loads(RAY_SCHEMA.read_text()))


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c.update(max_workers="many"), id="max_workers-not-int"),
    pytest.param(lambda c: c.update(max_worker=8), id="unknown-top-level-key"),
    pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(sensor_host=0.25),
                 id="fractional-node-resource"),
    pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_worker=1),
                 id="unknown-node-type-key"),
    pytest.param(lambda c: c.update(head_node_type="ray.head.missing"), id="head-type-not-declared"),
    pytest.param(lambda c: c.update(max_workers=0) or c["available_node_types"]["ray.worker.gpu"].update(min_workers=2),
                 id="min-workers-above-global-max"),
])
def test_validator_rejects_a_broken_copy(cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(broken)


def test_cluster_targets_aws_with_region_and_zone(cluster):
    provider = cluster["provider"]
    assert provider["type"] == "aws"
    assert provider["region"]
    assert all(zone.startswith(provider["region"]) for zone in provider["availability_zone"].split(","))


def test_head_is_declared_and_takes_no_client_actors(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert CUSTOM_RESOURCE not in head["resources"]


def test_gpu_worker_type_autoscales_and_declares_the_custom_resource(cluster):
    workers = gpu_worker_types(cluster)
    assert workers, "no worker node type declares a GPU"
    for name, node in workers.items():
        assert node["resources"].get(CUSTOM_RESOURCE, 0) >= 1, name
        assert node["resources"].get("CPU", 0) >= 1, name
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], name
        assert node["max_workers"] >= 1, name
        assert node["max_workers"] <= cluster["max_workers"], name
        assert node["node_config"]["InstanceType"], name


def test_four_actor_shares_fit_one_gpu_worker(cluster):
    # The share cluster.yaml's comments suggest (sensor_host 0.25, num_gpus 0.25, num_cpus 1)
    # puts four client actors on each GPU worker.
    for name, node in gpu_worker_types(cluster).items():
        res = node["resources"]
        per_node = min(res[CUSTOM_RESOURCE] / 0.25, res["GPU"] / 0.25, res["CPU"] / 1)
        assert per_node >= 4, name


def test_setup_commands_install_raysim_on_every_node(cluster):
    prepared = ray_up_validate(cluster)
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        commands = " ".join(prepared[key])
        assert "pip install" in commands and "raysim" in commands, key
        # torch is installed before raysim, so pip does not pick a torch wheel for raysim's dependency.
        assert commands.index("torch") < commands.index("raysim"), key
    # boto3 stays on the head: the autoscaler there launches the EC2 workers with it.
    assert "boto3" in " ".join(prepared["head_setup_commands"])


def test_raysim_source_is_mounted_where_it_is_installed(cluster):
    mounts = cluster.get("file_mounts", {})
    commands = " ".join(cluster["setup_commands"])
    installed_from_mount = [remote for remote, local in mounts.items()
                            if (CLUSTER_YAML.parent / local).resolve() == ROOT and remote in commands]
    installed_from_git = "git+" in commands
    assert installed_from_mount or installed_from_git
    for pattern in (".venv", "runs"):  # the local virtualenv and run directories stay local
        assert pattern in cluster["rsync_exclude"]


# --- examples/kuberay-rayjob.yaml (no Kubernetes schema offline: shape checks only) ---------

def test_rayjob_runs_a_raysim_scenario(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith("raysim run ") and "--address auto" in entrypoint
    scenario = entrypoint.split()[2]
    assert (ROOT / scenario).is_file(), scenario


def test_rayjob_gpu_workers_declare_gpus_and_the_custom_resource(rayjob):
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = cluster_spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        # rayStartParams.resources reaches `ray start --resources` as one quoted JSON word.
        start_resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert start_resources[CUSTOM_RESOURCE] >= 1

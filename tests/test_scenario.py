"""Scenario loading, overrides and validation messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

import raysim
from raysim import ScenarioError, load_scenario
from raysim.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "data" / "bad_scenarios").glob("*.yaml"))


def _expected(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name} must start with '# expect: a | b'"
    return [part.strip() for part in first.removeprefix("# expect:").split("|")]


def raysim_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysim.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenarios_validate(path):
    scenario = load_scenario(path)
    assert scenario.name


def test_quickstart_has_the_documented_shape():
    scenario = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    assert scenario.fleet.sensors == 1000
    assert scenario.aggregation.cohort == 100
    assert scenario.training.rounds == 20
    assert scenario.model.name == "mlp"
    assert [t.name for t in scenario.fleet.tiers] == ["gateway", "iot"]


def test_defaults_are_filled_and_scenario_is_frozen():
    scenario = load_scenario({"name": "tiny"})
    assert scenario.training.rounds >= 1 and scenario.aggregation.strategy.name == "fedavg"
    with pytest.raises(pydantic.ValidationError):
        scenario.training.rounds = 5  # type: ignore[misc]


def test_resolved_scenario_round_trips_through_yaml():
    scenario = load_scenario(ROOT / "scenarios" / "quickstart.yaml", ["training.rounds=3"])
    again = load_scenario(yaml.safe_load(scenario.to_yaml()))
    assert again.to_dict() == scenario.to_dict()


def test_overrides_parse_values_as_yaml():
    scenario = load_scenario(
        {"name": "x"}, ["training.rounds=3", "model.hidden=[32, 16]", "training.batch_size=full", "fleet.sensors=50", "aggregation.cohort=10"]
    )
    assert scenario.training.rounds == 3
    assert tuple(scenario.model.hidden) == (32, 16)
    assert scenario.training.batch_size == "full"
    assert scenario.fleet.sensors == 50


def test_override_of_unknown_key_suggests_the_close_one():
    with pytest.raises(ScenarioError) as info:
        load_scenario({"name": "x"}, ["training.epochz=2"])
    assert "training.epochz" in str(info.value) and "--set" in str(info.value)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ScenarioError, match="training.rounds is not a section"):
        load_scenario({"name": "x", "training": {"rounds": 3}}, ["training.rounds.deep=2"])


def test_malformed_override_is_an_error():
    with pytest.raises(ScenarioError, match="a.b=value"):
        load_scenario({"name": "x"}, ["training.rounds"])


def test_missing_file_is_named():
    with pytest.raises(ScenarioError, match="nope.yaml does not exist"):
        load_scenario("nope.yaml")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_scenario_error_names_file_field_and_expectation(path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert path.name in message
    for fragment in _expected(path):
        assert fragment in message, f"{fragment!r} missing from: {message}"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_validate_command_exits_2_with_one_paragraph(path, capsys):
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysim: error:") and path.name in err
    assert "Traceback" not in err and "\n\n" not in err.strip()


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_run_command_refuses_bad_scenario_before_creating_anything(path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    assert path.name in capsys.readouterr().err
    assert not out.exists()


def test_validate_cli_process_exit_status_is_2():
    done = raysim_cli("validate", str(BAD[0]))
    assert done.returncode == 2
    assert done.stderr.startswith("raysim: error:") and "Traceback" not in done.stderr


def test_validate_cli_accepts_good_scenario_and_prints_it_resolved():
    done = raysim_cli("validate", str(ROOT / "scenarios" / "quickstart.yaml"), "--set", "training.rounds=4")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["training"]["rounds"] == 4
    assert resolved["training"]["local_epochs"] == 1  # default filled in


def test_unknown_cli_flag_exits_2():
    done = raysim_cli("run", "scenarios/quickstart.yaml", "--rounds", "3", cwd=ROOT)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "--rounds" in done.stderr


def test_learning_rate_schedules_follow_their_formulas():
    def rates(schedule, rounds=10, lr=0.2):
        s = raysim.load_scenario({"training": {"lr": lr, "rounds": rounds, "lr_schedule": schedule}})
        return [s.training.lr_schedule.at(lr, r, rounds) for r in range(1, rounds + 1)]

    assert rates({"kind": "constant"}) == [0.2] * 10
    # ×0.9 every 3 rounds: rounds 1-3 at 0.2, 4-6 at 0.18, 7-9 at 0.162, 10 at 0.1458.
    assert rates({"kind": "step", "gamma": 0.9, "every": 3}) == pytest.approx([0.2] * 3 + [0.18] * 3 + [0.162] * 3 + [0.1458])
    cosine = rates({"kind": "cosine", "min_lr": 0.02})
    assert cosine[0] == pytest.approx(0.2) and cosine[5] == pytest.approx(0.11)  # halfway: the mean of lr and min_lr
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 0.02
    with pytest.raises(raysim.ScenarioError, match="min_lr"):
        raysim.load_scenario({"training": {"lr": 0.1, "lr_schedule": {"kind": "cosine", "min_lr": 0.5}}})

"""``raysim bench`` in its smoke configuration: well-formed results, never timings.

One smoke run (through the ``raysim`` command, on the shared Ray session) is
read by every test below. Every figure checked is either recomputed from
other reported figures (ratios, throughputs, GB) or from first principles
(bytes per round = cohort × 4 × the model's parameter count), never compared
with a number the harness produced for itself.
"""

from __future__ import annotations

import json
import math

import pytest

from raysim.bench import SMOKE, SUITES, main as bench_main
from raysim.cli import main
from raysim.models import DSCNNConfig, MLPConfig, ParamLayout, build_model

# The workload's data shape (6 channels × 32 steps, 6 classes), and its models built independently of the harness.
SHAPE = dict(channels=6, window=32, classes=6)
PARAMETERS = {
    "mlp": ParamLayout.of(build_model(MLPConfig(hidden=(64,)), **SHAPE)).size,
    "dscnn": ParamLayout.of(build_model(DSCNNConfig(), **SHAPE)).size,
}


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "scale.json"
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text(), parse_constant=_no_constants), out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.ray
def test_every_suite_and_the_machine_are_reported(smoke):
    report, _ = smoke
    for key in ("machine", "started", "config", *SUITES, "acceptance"):
        assert key in report, key
    for suite in SUITES:
        assert report[suite], suite
    assert set(report["config"]["suites"]) == set(SUITES) and report["config"]["smoke"] is True
    for key in ("cpus", "ram_gb", "python", "torch", "ray", "platform", "processor"):
        assert key in report["machine"]


@pytest.mark.ray
def test_steady_state_counts_every_update_of_the_rounds_after_the_first(smoke):
    report, _ = smoke
    runs = report["scaling"]
    assert {r["cohort"] for r in runs if r["sweep"] == "cohort"} == set(SMOKE["cohorts"])
    assert {r["client_actors"] for r in runs if r["sweep"] == "actors"} == set(SMOKE["actors"])
    for r in runs:
        assert r["rounds"] == SMOKE["rounds"] and r["steady_rounds"] == r["rounds"] - 1
        assert r["steady_updates"] == r["cohort"] * r["steady_rounds"]  # full participation, nothing dropped
        assert positive(r["steady_wall_s"]) and positive(r["throughput_updates_per_s"])
        assert close(r["throughput_updates_per_s"], r["steady_updates"] / r["steady_wall_s"])
        assert close(r["steady_round_s"], r["steady_wall_s"] / r["steady_rounds"])
        assert positive(r["makespan_s"]) and len(r["actor_busy_s"]) == r["client_actors"]
        assert all(positive(busy) for busy in r["actor_busy_s"])
        assert close(r["balance"], (sum(r["actor_busy_s"]) / len(r["actor_busy_s"])) / max(r["actor_busy_s"]))
        assert 0 < r["balance"] <= 1


@pytest.mark.ray
def test_baseline_ratio_is_the_plain_loop_over_raysim(smoke):
    report, _ = smoke
    assert [r["workload"] for r in report["baseline"]] == list(SMOKE["models"])
    for r in report["baseline"]:
        assert r["sensors"] == SMOKE["baseline_sensors"]
        assert len(r["plain_rounds_s"]) == SMOKE["baseline_rounds"] and all(map(positive, r["plain_rounds_s"]))
        timed = r["plain_rounds_s"][1:]  # the first round is warm-up
        assert close(r["plain_round_s"], sum(timed) / len(timed))
        assert positive(r["raysim_round_s"])
        assert close(r["ratio"], r["plain_round_s"] / r["raysim_round_s"])
        assert close(r["plain_throughput_updates_per_s"], r["sensors"] / r["plain_round_s"])
        assert r["parameters"] == PARAMETERS[r["model"]["name"]]
        accepted = report["acceptance"][f"{r['workload']}_ratio"]
        assert close(accepted["value"], r["ratio"]) and accepted["pass"] == (r["ratio"] >= accepted["floor"])


@pytest.mark.ray
def test_scaling_ratio_is_the_quotient_of_the_reported_throughputs(smoke):
    report, _ = smoke
    by_cohort = {r["cohort"]: r["throughput_updates_per_s"] for r in report["scaling"] if r["sweep"] == "cohort"}
    entry = report["acceptance"]["scaling_10k_over_1k"]
    low, high = entry["cohorts"]
    assert (low, high) == (min(SMOKE["cohorts"]), max(SMOKE["cohorts"]))
    assert close(entry["value"], by_cohort[high] / by_cohort[low])
    assert entry["pass"] == (entry["value"] >= entry["floor"]) and entry["floor"] == 0.8
    assert entry["at_spec"] is False  # the smoke sizes are not the 1,000 → 10,000


@pytest.mark.ray
def test_memory_figures_are_positive_and_add_up(smoke):
    report, _ = smoke
    rows = report["memory"]
    assert {r["cohort"] for r in rows if r["sweep"] == "cohort"} == set(SMOKE["cohorts"])
    for r in rows:
        parts = [r["driver_peak_mb"], r["coordinator_peak_mb"], *r["client_actors_peak_mb"]]
        assert all(map(positive, parts)) and len(r["client_actors_peak_mb"]) == r["client_actors"]
        assert close(r["client_actors_total_mb"], sum(r["client_actors_peak_mb"]))
        assert math.isclose(r["total_peak_mb"], sum(parts), rel_tol=1e-6)
        assert close(r["total_peak_gb"], r["total_peak_mb"] * 2**20 / 1e9)
    (big,) = [r for r in rows if r["sweep"] == "fleet"]
    assert (big["fleet"], big["cohort"], big["fresh_driver"]) == (SMOKE["memory_fleet"], SMOKE["memory_cohort"], True)
    entry = report["acceptance"]["peak_memory_100k_gb"]
    assert close(entry["value"], big["total_peak_gb"]) and entry["pass"] == (entry["value"] < entry["ceiling"])


@pytest.mark.ray
def test_communication_bytes_are_one_float32_model_each_way_per_sensor(smoke):
    report, _ = smoke
    rows = report["communication"]
    assert {(r["fleet"], r["cohort"]) for r in rows} >= {(k, k) for k in SMOKE["cohorts"]}
    for r in rows:
        per_sensor = 4 * PARAMETERS[r["model"]]  # no codec, no loss: every transfer is the float32 vector, once
        assert r["bytes_up_per_round"] == r["cohort"] * per_sensor
        assert r["bytes_down_per_round"] == r["cohort"] * per_sensor
        assert r["bytes_up"] == r["rounds"] * r["cohort"] * per_sensor
        assert r["bytes_up_per_update"] == per_sensor
        assert positive(r["virtual_s"])
        assert close(r["bytes_up_per_virtual_s"], r["bytes_up"] / r["virtual_s"])
        assert close(r["bytes_down_per_virtual_s"], r["bytes_down"] / r["virtual_s"])


@pytest.mark.ray
def test_plots_are_written_next_to_the_results(smoke):
    report, out = smoke  # matplotlib is in the test extras, so the plots are always made here
    expected = {f"scale_{name}.png" for name in ("throughput_cohort", "throughput_actors", "memory_cohort", "baseline")}
    assert set(report["plots"]) == expected
    for name in expected:
        png = out.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


@pytest.mark.parametrize("argv, named", [
    (["--cohorts", "0"], "--cohorts"),
    (["--cohorts", "abc"], "--cohorts"),
    (["--actors", "1,-2"], "--actors"),
    (["--rounds", "1"], "--rounds"),
    (["--suite", "speed"], "--suite"),
    (["--models", "resnet"], "--models"),
    (["--fleet-for-memory", "10", "--memory-cohort", "20"], "--memory-cohort"),
])
def test_bad_flag_values_are_one_paragraph_and_status_2(argv, named, tmp_path, capsys):
    for run in (lambda: main(["bench", *argv, "--out", str(tmp_path / "r.json")]),
                lambda: bench_main([*argv, "--out", str(tmp_path / "r.json")])):
        assert run() == 2
        err = capsys.readouterr().err
        assert err.startswith("raysim: error:") and named in err
        assert "Traceback" not in err and "\n\n" not in err.strip()
    assert not (tmp_path / "r.json").exists()


def test_unknown_flag_is_argparse_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err

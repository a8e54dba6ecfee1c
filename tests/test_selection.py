"""Client selection policies and participation fairness."""

from __future__ import annotations

import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import raysim
from helpers import assert_same_run, run_stopped_at, with_changes
from raysim.cli import main
from raysim.fleet.profiles import build_profiles
from raysim.scenario import load_scenario
from raysim.selection import Selector, jain_index, quotas


def tier(name: str, share: float, **extra) -> dict:
    return {"name": name, "share": share, "seconds_per_sample": 0.001, "up_mbps": 10, "down_mbps": 10, **extra}


def spec(**changes) -> dict:
    return with_changes({
        "name": "selection",
        "seed": 5,
        "fleet": {"sensors": 60, "data": {"kind": "synthetic", "samples_per_sensor": 12, "test_samples": 100,
                                          "test_sensors": 4},
                  "tiers": [tier("gateway", 0.2), tier("phone", 0.3), tier("iot", 0.5)]},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 6, "batch_size": 6, "lr": 0.1},
        "aggregation": {"cohort": 10},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def _selector(changes: dict, durations: np.ndarray | None = None) -> Selector:
    scenario = load_scenario(spec(**changes))
    n = scenario.fleet.sensors
    profiles = build_profiles(scenario, np.arange(n), np.arange(n) % 7 + 5)
    return Selector(scenario, profiles, availability=None,
                    expected_duration_s=np.ones(n) if durations is None else durations)


def test_jain_index():
    assert jain_index(np.array([3, 3, 3, 3])) == pytest.approx(1.0)
    assert jain_index(np.array([0, 0, 5, 0])) == pytest.approx(0.25)
    assert jain_index(np.array([1, 2, 3])) == pytest.approx(36 / (3 * 14))
    assert np.isnan(jain_index(np.zeros(4)))


def test_quotas_follow_the_shares():
    assert quotas(np.array([0.2, 0.3, 0.5]), 10).tolist() == [2, 3, 5]
    assert quotas(np.array([1, 1, 1]), 10).sum() == 10


@pytest.mark.parametrize("shares", [None, {"gateway": 0.5, "phone": 0.0, "iot": 0.5}])
def test_stratified_gives_every_tier_its_quota_in_every_round(shares):
    selector = _selector({"aggregation.selection": {"policy": "stratified", "shares": shares}})
    rng = np.random.default_rng(0)
    want = quotas(selector.shares, 10)
    for r in range(1, 200):
        online = np.flatnonzero(rng.random(60) < 0.7)  # a random 70 % online
        chosen = selector.choose(online, 10, 0.0, r, rng)
        assert len(chosen) == len(set(chosen.tolist())) == 10 and np.isin(chosen, online).all()
        per_tier = np.bincount(selector.profiles.tier[chosen], minlength=3)
        available = np.bincount(selector.profiles.tier[online], minlength=3)
        if (available >= want).all():
            assert per_tier.tolist() == want.tolist()
        else:  # a short tier gives all it has; the others fill its places
            assert (per_tier >= np.minimum(want, available)).all()


def test_oort_explores_then_exploits_the_highest_utility():
    durations = np.ones(60)
    durations[:5] = 100.0  # five very slow sensors
    selector = _selector({"aggregation.selection": {"policy": "oort", "exploration": 0.2,
                                                    "preferred_duration_s": 1.0}}, durations)
    rng = np.random.default_rng(1)
    online = np.arange(60)
    first = selector.choose(online, 10, 0.0, 1, rng)  # nothing tried yet: all exploration
    loss = np.linspace(0.1, 2.0, 10)
    selector.report(first, loss, 1)
    tried = set(first.tolist())
    second = selector.choose(online, 10, 0.0, 2, rng)
    fresh = [p for p in second.tolist() if p not in tried]
    assert len(fresh) == 2  # 20 % of the cohort explores
    exploit = [p for p in second.tolist() if p in tried]
    utility = selector.utility(first, 2)
    best = set(first[np.argsort(-utility)[:8]].tolist())
    assert set(exploit) == best
    # The slowness penalty: with equal losses, a slow sensor ranks last.
    selector.report(np.arange(60), np.ones(60), 2)
    assert set(np.argsort(selector.utility(np.arange(60), 3))[:5].tolist()) == set(range(5))


# ---------------------------------------------------------------------- runs


@pytest.mark.ray
def test_a_stratified_run_keeps_the_shares_and_reports_fairness(ray_session, tmp_path):
    run = raysim.run(spec(**{"aggregation.selection": {"policy": "stratified",
                                                       "shares": {"gateway": 0.5, "phone": 0.2, "iot": 0.3}}}),
                     out_dir=tmp_path / "run")
    metrics = run.metrics.to_pandas()
    assert (metrics["selected.gateway"] == 5).all() and (metrics["selected.phone"] == 2).all()
    assert (metrics["selected.iot"] == 3).all()
    # Jain's index of the selection counts so far, recomputed from the events.
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    for r in metrics["round"]:
        counts = events[events["round"] <= r].groupby("sensor").size().reindex(range(60), fill_value=0).to_numpy()
        assert metrics.loc[metrics["round"] == r, "participation_fairness"].item() == pytest.approx(jain_index(counts))


ASYNC = {"aggregation.mode": "async", "aggregation.strategy": {"name": "fedbuff", "concurrency": 20, "buffer_size": 10}}


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_availability_aware_selection_avoids_sensors_about_to_leave(ray_session, tmp_path, mode):
    # Sensors online 20 s on average and tasks of a few seconds: uniform selection loses some to the off
    # switch; the oracle predictor never picks a sensor that leaves during its (jitter- and loss-free) task.
    slow = {"seconds_per_sample": 0.3, "availability": {"kind": "onoff", "mean_on_s": 20, "mean_off_s": 10}}
    changes = {"fleet.tiers": [tier("gateway", 0.5), tier("iot", 0.5, **slow)], "training.rounds": 12,
               "fleet.sensors": 120, "aggregation.cohort": 20, **(ASYNC if mode == "async" else {})}
    uniform = raysim.run(spec(**changes), out_dir=tmp_path / "uniform")
    oracle = raysim.run(spec(**changes, **{"aggregation.selection": {"policy": "availability", "predictor": "oracle"}}),
                        out_dir=tmp_path / "oracle")
    assert uniform.metrics["updates_offline"].to_numpy().sum() > 0
    assert oracle.metrics["updates_offline"].to_numpy().sum() == 0


@pytest.mark.ray
def test_an_oort_run_resumes_with_its_selection_state(ray_session, tmp_path):
    changes = {"aggregation.selection": {"policy": "oort"}, "training.rounds": 60, "checkpoint.every": 3}
    whole = raysim.run(spec(**changes), out_dir=tmp_path / "whole")
    run_dir = run_stopped_at(spec(**changes), tmp_path, at_least=6, sig=signal.SIGKILL)
    assert_same_run(raysim.run(None, resume=run_dir), whole)


@pytest.mark.parametrize("changes, expected", [
    ({"aggregation.selection": {"policy": "stratified", "shares": {"gateways": 1.0}}},
     "aggregation.selection.shares: 'gateways' is not a tier"),
    ({"aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 10},
                      "selection": {"policy": "oort"}}}, "async runs take uniform or availability"),
])
def test_bad_selection_settings_are_one_paragraph_and_status_2(tmp_path, capsys, changes, expected):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(**changes)))
    assert main(["validate", str(scenario)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and "Traceback" not in err

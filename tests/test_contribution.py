"""Contribution scores (leave-one-out, Monte-Carlo Shapley, proxies) and trust-weighted aggregation."""

from __future__ import annotations

import json
import signal

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch.nn import functional as F

import raysim
from helpers import assert_same_run, run_stopped_at, with_changes
from raysim.attacks import choose_attackers
from raysim.cli import main
from raysim.contribution import ContributionScorer
from raysim.models import MLPConfig, ParamLayout, build_model
from raysim.scenario import Contribution

# Honest sensors alike (same sample count, calibration and label mix), so a corrupted one stands out.
ALIKE = {"quantity_sigma": 0, "label_alpha": 100, "preprocess": {"zscore": True},
         "feature_skew": {"gain_sigma": 0, "bias_sigma": 0, "rotation_deg": 0, "noise_min": 0.2, "noise_max": 0.2}}


def spec(**changes) -> dict:
    return with_changes({
        "name": "contribution",
        "seed": 5,
        "fleet": {"sensors": 60, "data": {"kind": "synthetic", "samples_per_sensor": 64, "test_samples": 600,
                                          "test_sensors": 12, **ALIKE}},
        "model": {"name": "mlp", "hidden": [32]},
        "training": {"rounds": 30, "batch_size": 16, "lr": 0.2},
        "aggregation": {"cohort": 20},
        "attack": {"kind": "label_flip", "fraction": 0.2},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False, "tensorboard": False},
    }, changes)


def _scorer(method: str, **config) -> tuple[ContributionScorer, np.ndarray, np.ndarray, np.ndarray]:
    model = build_model(MLPConfig(hidden=(6,)), 2, 8, 3, seed=1)
    layout = ParamLayout.of(model)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 2, 8)).astype(np.float32), rng.integers(3, size=40)
    scorer = ContributionScorer(Contribution(method=method, **config), model, layout, x, y, fleet_size=10, seed=0)
    weights = layout.flatten(model)
    updates = rng.normal(scale=0.3, size=(5, layout.size))
    a = np.array([1.0, 2.0, 1.0, 3.0, 1.0])
    return scorer, weights, updates, a


def _value(scorer: ContributionScorer, flat: np.ndarray) -> float:
    with torch.no_grad():
        scorer.layout.load_into(scorer.model, flat.astype(np.float32))
        return -float(F.cross_entropy(scorer.model(scorer.x), scorer.y))


def test_leave_one_out_is_the_value_lost_without_each_update():
    scorer, w, u, a = _scorer("loo")
    scores, method = scorer.score(w, u, a, np.random.default_rng(0))
    everyone = _value(scorer, w + a @ u / a.sum())
    for i in range(5):
        rest = np.arange(5) != i
        without = _value(scorer, w + a[rest] @ u[rest] / a[rest].sum())
        assert scores[i] == pytest.approx(everyone - without, abs=1e-5)
    assert method == "loo"


def test_shapley_values_add_up_to_the_value_of_the_whole_round():
    scorer, w, u, a = _scorer("shapley", permutations=7)
    scores, _ = scorer.score(w, u, a, np.random.default_rng(3))
    assert scores.sum() == pytest.approx(_value(scorer, w + a @ u / a.sum()) - _value(scorer, w), abs=1e-5)
    # Against the exact Shapley values of 3 updates, from all 6 orders.
    import itertools

    scorer3, w3, u3, a3 = _scorer("shapley", permutations=3000)
    u3, a3 = u3[:3], a3[:3]
    exact = np.zeros(3)
    for order in itertools.permutations(range(3)):
        before = _value(scorer3, w3)
        for k, i in enumerate(order):
            members = list(order[: k + 1])
            after = _value(scorer3, w3 + a3[members] @ u3[members] / a3[members].sum())
            exact[i] += (after - before) / 6
            before = after
    estimate, _ = scorer3.score(w3, u3, a3, np.random.default_rng(4))
    np.testing.assert_allclose(estimate, exact, atol=0.1 * np.abs(exact).max())


def test_the_proxies():
    scorer, w, u, a = _scorer("cosine")
    scores, _ = scorer.score(w, u, a, np.random.default_rng(0))
    mean = a @ u / a.sum()
    expected = u @ mean / (np.linalg.norm(u, axis=1) * np.linalg.norm(mean))
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    scorer, w, u, a = _scorer("loss")
    scores, _ = scorer.score(w, u, a, np.random.default_rng(0))
    for i in range(5):
        assert scores[i] == pytest.approx(_value(scorer, w + u[i]) - _value(scorer, w), abs=1e-5)


def test_large_rounds_fall_back_to_the_proxy():
    scorer, w, u, a = _scorer("loo", max_exact=4, fallback="cosine")
    assert scorer.score(w, u, a, np.random.default_rng(0))[1] == "cosine"


def test_trust_follows_whether_updates_helped():
    scorer, *_ = _scorer("loo", trust=True, trust_decay=0.5)
    scorer.record(1, np.array([0, 1, 2]), np.array([10, 11, 12]), np.array([0.2, -0.1, 0.0]), "loo")
    np.testing.assert_allclose(scorer.trust[:4], [1.0, 0.5, 0.5, 1.0])
    scorer.record(2, np.array([0, 1, 2, 3]), np.array([10, 11, 12, 13]), np.array([0.9, 0.8, 0.1, 0.2]), "cosine")
    np.testing.assert_allclose(scorer.trust[:4], [1.0, 0.75, 0.25, 0.5])  # cosine: at least the median helps


# ---------------------------------------------------------------------- runs


@pytest.mark.ray
@pytest.mark.parametrize("method", ["loo", "cosine"])
def test_label_flipping_sensors_rank_at_the_bottom(ray_session, tmp_path, method):
    run = raysim.run(spec(contribution={"method": method}), out_dir=tmp_path / method)
    scores = pq.read_table(run.run_dir / "contributions.parquet").to_pandas().groupby("sensor").score.mean()
    flipped = set(np.flatnonzero(choose_attackers(5, np.arange(60), 0.2)).tolist())
    assert set(scores.sort_values().index[: len(flipped)].tolist()) == flipped
    bottom = {entry["sensor"] for entry in run.summary["contribution"]["bottom"]}
    assert bottom <= flipped  # the ten lowest in the summary are flipped ones


@pytest.mark.ray
def test_trust_weighted_aggregation_recovers_from_label_flipping(ray_session, tmp_path):
    changes = {"attack.fraction": 0.4, "fleet.sensors": 100}
    plain = raysim.run(spec(**changes), out_dir=tmp_path / "plain")
    trusted = raysim.run(spec(**changes, contribution={"method": "loo", "trust": True}), out_dir=tmp_path / "trust")
    assert trusted.metrics["accuracy"].to_pylist()[-1] > plain.metrics["accuracy"].to_pylist()[-1] + 0.1
    # The scores' file and the summary are there, and the report lists the contributors.
    assert run_report(trusted.run_dir).count("bottom") == 10


def run_report(run_dir) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir)]) == 0
    return out.getvalue()


@pytest.mark.ray
def test_duplicating_sensors_train_on_a_few_distinct_windows(ray_session, tmp_path):
    from raysim.client import ClientActor
    from raysim.fleet import prepare_fleet
    from raysim.scenario import load_scenario
    import raysim.api

    scenario = load_scenario(spec(attack={"kind": "duplicate", "fraction": 0.2, "keep": 0.25}))
    fleet = prepare_fleet(scenario, raysim.api.default_cache_dir())
    actor = ClientActor(scenario, fleet, np.arange(60))
    chosen = set(np.flatnonzero(choose_attackers(5, np.arange(60), 0.2)).tolist())
    for sid in range(60):
        x, _ = actor.shard.samples(sid)
        distinct = len(np.unique(x.reshape(len(x), -1), axis=0))
        assert distinct == (16 if sid in chosen else 64)


@pytest.mark.ray
def test_a_trust_weighted_run_resumes_to_the_uninterrupted_result(ray_session, tmp_path):
    changes = {"training.rounds": 60, "checkpoint.every": 3, "contribution": {"method": "loo", "trust": True}}
    whole = raysim.run(spec(**changes), out_dir=tmp_path / "whole")
    run_dir = run_stopped_at(spec(**changes), tmp_path, at_least=6, sig=signal.SIGKILL)
    resumed = raysim.run(None, resume=run_dir)
    assert_same_run(resumed, whole)
    kept = pq.read_table(run_dir / "contributions.parquet")
    assert kept.equals(pq.read_table(whole.run_dir / "contributions.parquet"))


@pytest.mark.parametrize("changes, expected", [
    ({"aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 10}},
      "contribution": {}}, "contribution scores a synchronous round's updates"),
    ({"fleet.data": {"kind": "parquet", "path": "a.parquet", "test_path": "b.parquet"}, "contribution": {}},
     "contribution.validation_path: a Parquet fleet needs a labelled validation file"),
])
def test_bad_contribution_settings_are_one_paragraph_and_status_2(tmp_path, capsys, changes, expected):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(yaml.safe_dump(spec(**changes)))
    assert main(["validate", str(scenario)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and "Traceback" not in err


@pytest.mark.ray
@pytest.mark.parametrize("section, field", [("proxy", "path"), ("contribution", "validation_path")])
def test_side_files_of_a_parquet_fleet_are_checked_and_used(ray_session, tmp_path, capsys, section, field):
    import pyarrow as pa
    from test_bad_data import good_columns, scenario_for

    scenario = scenario_for(tmp_path, good_columns())
    spec_ = yaml.safe_load(scenario.read_text())
    if section == "proxy":
        spec_.update(distillation={}, proxy={"samples": 30, "path": "side.parquet"})
    else:
        spec_.update(contribution={"validation_samples": 30, "validation_path": "side.parquet"})
    scenario.write_text(yaml.safe_dump(spec_))
    pq.write_table(pa.table(good_columns(sensors=2, per_sensor=5)), tmp_path / "side.parquet")  # 10 windows
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"({section}.{field}) holds 10 samples, fewer than" in err and "Traceback" not in err
    pq.write_table(pa.table(good_columns(sensors=8, per_sensor=5, length=10)), tmp_path / "side.parquet")
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"({section}.{field}): column 'x' must have the fleet's shape" in err
    assert not (tmp_path / "run").exists()
    pq.write_table(pa.table(good_columns(sensors=8, per_sensor=5)), tmp_path / "side.parquet")
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if section == "proxy":
        assert summary["architectures"][0]["bytes_down_per_task"] > summary["architectures"][0]["parameters"] * 4
    else:
        assert summary["contribution"]["scored_updates"] == 2

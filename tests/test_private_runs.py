"""Differential privacy in whole runs: central DP-FedAvg, adaptive clipping, local DP, accounting and budgets."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from opacus.accountants import RDPAccountant

import raysim
from helpers import with_changes
from raysim.privacy import epsilon

pytestmark = pytest.mark.ray

FLEET = 60
COHORT = 20
CLIP = 0.05  # below every update's norm here, so clipping is never a no-op


def scenario(**changes) -> raysim.Scenario:
    # Equal sample counts, a lossless always-online tier and wait-all: every selected sensor delivers (n = m).
    return raysim.load_scenario(with_changes({
        "name": "private",
        "seed": 5,
        "fleet": {"sensors": FLEET, "data": {"samples_per_sensor": 16, "quantity_sigma": 0.0, "test_samples": 200,
                                             "test_sensors": 5}},
        "model": {"name": "mlp", "hidden": [8]},
        "training": {"rounds": 1, "batch_size": 8, "lr": 0.1},
        "aggregation": {"cohort": COHORT},
        "cluster": {"num_cpus": 0.5, "client_actors": 2},
        "logging": {"progress": False},
    }, changes))


def opacus_epsilons(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> list[float]:
    accountant, spent = RDPAccountant(), []
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        spent.append(accountant.get_epsilon(delta))
    return spent


@pytest.fixture(scope="module")
def one_round(ray_session, tmp_path_factory):
    """One round each: clipped uniform FedAvg, and central DP with z = 0 and z = 3 (same cohort, same training)."""
    out = tmp_path_factory.mktemp("one-round")
    return {
        "clipped": raysim.run(scenario(**{"aggregation.clip_norm": CLIP, "aggregation.strategy.weighting": "uniform"}),
                              out_dir=out / "clipped"),
        "z0": raysim.run(scenario(privacy={"noise_multiplier": 0.0, "clip_norm": CLIP}), out_dir=out / "z0"),
        "z3": raysim.run(scenario(privacy={"noise_multiplier": 3.0, "clip_norm": CLIP}), out_dir=out / "z3"),
    }


def test_central_dp_without_noise_is_clipped_fedavg(one_round):
    np.testing.assert_allclose(one_round["z0"].global_weights, one_round["clipped"].global_weights, atol=1e-7)
    assert not np.allclose(one_round["z0"].global_weights, one_round["z3"].global_weights, atol=1e-4)


def test_central_dp_noise_on_the_model_has_std_z_s_over_m(one_round):
    noise = one_round["z3"].global_weights.astype(np.float64) - one_round["z0"].global_weights
    expected = 3.0 * CLIP / COHORT
    # d ≈ 1,600 coordinates: the sample std is within 10 % of the truth with overwhelming probability (SE ≈ 1.8 %).
    assert noise.size > 1000
    assert noise.std() == pytest.approx(expected, rel=0.1)
    assert abs(noise.mean()) < 5 * expected / np.sqrt(noise.size)


def test_epsilon_follows_opacus_round_by_round_and_the_run_stops_at_the_budget(ray_session, tmp_path, capsys,
                                                                               monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    z, delta = 1.2, 1e-4
    reference = opacus_epsilons(COHORT / FLEET, z, 6, delta)
    target = (reference[3] + reference[4]) / 2  # allows four rounds, not five
    run = raysim.run(scenario(**{"training.rounds": 6, "logging.eval_every": 3},
                              privacy={"noise_multiplier": z, "clip_norm": CLIP, "delta": delta,
                                       "target_epsilon": target}), out_dir=tmp_path / "run")
    spent = run.metrics.column("epsilon").to_pylist()
    assert run.metrics.column("round").to_pylist() == [1, 2, 3, 4]
    np.testing.assert_allclose(spent, reference[:4], rtol=1e-9)
    assert all(later > earlier for earlier, later in zip(spent, spent[1:]))
    privacy = run.summary["privacy"]
    assert privacy["epsilon"] == pytest.approx(reference[3]) and privacy["stopped_before_round"] == 5
    assert run.summary["rounds"] == 4
    # Round 4 is not an evaluation round (every 3rd), but it is the last: the final model is evaluated.
    accuracy = run.metrics.column("accuracy").to_numpy()
    assert np.isnan(accuracy[[0, 1]]).all() and np.isfinite(accuracy[[2, 3]]).all()
    assert run.summary["final_accuracy"] == accuracy[3]
    board = EventAccumulator(str(run.run_dir / "tb")).Reload()
    assert [e.step for e in board.Scalars("round/accuracy")] == [3, 4]
    assert [e.value for e in board.Scalars("round/privacy/epsilon")] == pytest.approx(spent, rel=1e-6)
    assert (run.run_dir / "checkpoints" / "final.npz").exists()
    # The report shows ε per round and why the run ended.
    from raysim.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert main(["report", str(run.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stopped before round 5" in out and f"{spent[-1]:.3g}" in out and "ε" in out


def test_adaptive_clipping_moves_the_bound_every_round_and_records_it(ray_session, tmp_path):
    # Every update's norm is far below the bound: all unclipped (b = 1), so with no count noise C shrinks by
    # exactly exp(−η_C·(1 − γ)) per round (the noise multiplier is 0, so nothing is charged for the count).
    run = raysim.run(scenario(**{"training.rounds": 3},
                              privacy={"noise_multiplier": 0.0, "clip_norm": 1e4,
                                       "adaptive": {"target_quantile": 0.3, "clip_lr": 0.2, "count_noise": 0.0}}),
                     out_dir=tmp_path / "run")
    bounds = run.metrics.column("dp_clip_norm").to_pylist()
    np.testing.assert_allclose(bounds, [1e4 * np.exp(-0.2 * (1 - 0.3) * r) for r in (1, 2, 3)], rtol=1e-9)
    state = np.load(run.run_dir / "checkpoints" / "final.npz")
    assert float(state["privacy.clip_norm"]) == pytest.approx(bounds[-1])


def test_local_dp_in_async_runs_charges_each_sensor_its_releases_and_warns_past_the_budget(ray_session, tmp_path):
    z, delta = 2.0, 1e-5
    s = scenario(**{"training.rounds": 8,
                    "aggregation": {"mode": "async", "strategy": {"name": "fedbuff", "concurrency": 12,
                                                                  "buffer_size": 4}}},
                 privacy={"mode": "local", "noise_multiplier": z, "clip_norm": CLIP, "delta": delta,
                          "target_epsilon": epsilon(1.0, z, 1, delta) * 1.01, "on_budget": "warn"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = raysim.run(s, out_dir=tmp_path / "run")
    events = pq.read_table(run.run_dir / "events.parquet").to_pandas()
    worst = events.groupby("sensor").cumcount().add(1).groupby(events["round"]).max().cummax()
    expected = [epsilon(1.0, z, int(worst[r]), delta) for r in run.metrics.column("round").to_pylist()]
    np.testing.assert_allclose(run.metrics.column("epsilon").to_pylist(), expected, rtol=1e-9)
    assert run.metrics.num_rows == 8  # warn: the run goes on
    over = [w for w in caught if issubclass(w.category, raysim.RaysimWarning)]
    assert len(over) == 1 and "target_epsilon" in str(over[0].message)
    assert run.summary["privacy"]["exceeded_at_round"] == int(np.argmax(np.array(expected) > expected[0] * 1.01)) + 1
    assert np.isnan(run.metrics.column("dp_clip_norm").to_numpy()).all()


def test_local_dp_clips_on_the_sensor_and_its_noise_averages_to_z_s_over_root_m(one_round, tmp_path):
    def local(z: float, name: str) -> np.ndarray:
        return raysim.run(scenario(**{"aggregation.strategy.weighting": "uniform"},
                                   privacy={"mode": "local", "noise_multiplier": z, "clip_norm": CLIP}),
                          out_dir=tmp_path / name).global_weights.astype(np.float64)

    clipped_only = local(0.0, "z0")
    np.testing.assert_allclose(clipped_only, one_round["clipped"].global_weights, atol=1e-7)
    # Each of the m sensors adds N(0, (z·S)²) per coordinate; the uniform mean of m has std z·S/√m.
    noise = local(3.0, "z3") - clipped_only
    assert noise.std() == pytest.approx(3.0 * CLIP / np.sqrt(COHORT), rel=0.1)


def test_a_budget_smaller_than_one_round_is_refused_before_anything_starts(tmp_path, capsys):
    from raysim.cli import main

    path = tmp_path / "tight.yaml"
    path.write_text("name: tight\nprivacy: {noise_multiplier: 1.0, clip_norm: 1.0, target_epsilon: 0.01}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "tight.yaml" in err and "privacy.target_epsilon" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_raysim_warnings_as_one_line(capsys):
    from raysim.cli import _show_warning

    _show_warning(raysim.RaysimWarning("budget spent"), raysim.RaysimWarning, "api.py", 1)
    assert capsys.readouterr().err == "raysim: warning: budget spent\n"

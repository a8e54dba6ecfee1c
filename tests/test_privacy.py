from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from opacus.accountants import RDPAccountant

from raysim.errors import AggregationError
from raysim.privacy import (
    AdaptiveClip,
    AdaptiveClipping,
    CentralDP,
    Privacy,
    PrivacyLedger,
    RunAccountant,
    central_dp_mean,
    clip_updates,
    effective_noise_multiplier,
    epsilon,
    local_dp,
)

modest = settings(max_examples=30, deadline=None)


def opacus_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """ε from Opacus's own accountant, stepped once per round: [(q, z, rounds), ...] in order."""
    accountant = RDPAccountant()
    for sample_rate, noise_multiplier, count in rounds:
        for _ in range(count):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def reference_clip(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    values = np.asarray(updates, dtype=np.float64)
    norms = np.sqrt((values**2).sum(axis=1))
    scale = np.minimum(1.0, clip_norm / np.where(norms > 0, norms, 1.0))
    return values * scale[:, None]


# --- clipping -------------------------------------------------------------------------------------------------


@modest
@given(
    updates=arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 30)), elements=st.floats(-100, 100, width=32)),
    clip_norm=st.floats(0.1, 50),
)
def test_clipping_bounds_norms_and_keeps_small_updates(updates, clip_norm):
    clipped, unclipped = clip_updates(updates, clip_norm)
    norms = np.linalg.norm(updates.astype(np.float64), axis=1)
    clipped_norms = np.linalg.norm(clipped.astype(np.float64), axis=1)
    assert clipped.shape == updates.shape
    assert (clipped_norms <= clip_norm * (1 + 1e-6)).all()
    np.testing.assert_array_equal(unclipped, norms <= clip_norm)
    np.testing.assert_array_equal(clipped[unclipped], updates[unclipped])
    # Clipped rows keep their direction and land on the sphere of radius S.
    np.testing.assert_allclose(clipped_norms[~unclipped], clip_norm, rtol=1e-5)
    np.testing.assert_allclose(clipped, reference_clip(updates, clip_norm), rtol=1e-5, atol=1e-6)


def test_clipping_does_not_modify_its_input():
    updates = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    before = updates.copy()
    clipped, unclipped = clip_updates(updates, 1.0)
    np.testing.assert_array_equal(updates, before)
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
    assert unclipped.tolist() == [False, True]


def test_an_update_exactly_on_the_bound_counts_as_unclipped():
    updates = np.array([[3.0, 4.0], [6.0, 8.0]])
    clipped, unclipped = clip_updates(updates, 5.0)
    assert unclipped.tolist() == [True, False]
    np.testing.assert_array_equal(clipped[0], [3.0, 4.0])


def test_clipping_refuses_non_finite_updates():
    with pytest.raises(AggregationError):
        clip_updates(np.array([[np.nan, 1.0]]), 1.0)


# --- central DP-FedAvg ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_updates, expected_cohort", [(5, 20), (20, 20), (30, 20)])
def test_central_noise_std_on_the_mean_is_z_s_over_m(num_updates, expected_cohort):
    clip_norm, noise_multiplier, dim = 2.0, 1.5, 200_000
    updates = np.zeros((num_updates, dim), dtype=np.float32)
    noisy = central_dp_mean(updates, clip_norm, noise_multiplier, expected_cohort, np.random.default_rng(0))
    expected_std = noise_multiplier * clip_norm / expected_cohort
    # The sample std of 200k normals is within 1% of the truth with overwhelming probability (SE ≈ 0.16%).
    assert noisy.shape == (dim,)
    assert noisy.std() == pytest.approx(expected_std, rel=0.01)
    assert abs(noisy.mean()) < 5 * expected_std / math.sqrt(dim)


def test_zero_noise_is_the_clipped_fedavg_mean():
    rng = np.random.default_rng(1)
    updates = rng.normal(0, 1, size=(8, 50)).astype(np.float32)
    updates[:3] *= 10  # some rows over the bound, some under
    clipped_mean = reference_clip(updates, 3.0).mean(axis=0)
    result = central_dp_mean(updates, 3.0, 0.0, expected_cohort=8, rng=rng)
    np.testing.assert_allclose(result, clipped_mean, rtol=1e-5, atol=1e-6)


def test_mean_divides_by_the_expected_cohort_not_the_realised_count():
    updates = np.ones((4, 3))
    result = central_dp_mean(updates, 100.0, 0.0, expected_cohort=10, rng=np.random.default_rng(0))
    np.testing.assert_allclose(result, np.full(3, 4 / 10))


def test_central_noise_is_seeded():
    updates = np.ones((3, 100), dtype=np.float32)
    first = central_dp_mean(updates, 1.0, 1.0, 3, np.random.default_rng(42))
    second = central_dp_mean(updates, 1.0, 1.0, 3, np.random.default_rng(42))
    np.testing.assert_array_equal(first, second)
    assert first.dtype == np.float32


# --- local DP -------------------------------------------------------------------------------------------------


def test_local_noise_std_is_z_s_per_coordinate():
    clip_norm, noise_multiplier, dim = 0.5, 2.0, 200_000
    noisy = local_dp(np.zeros(dim, dtype=np.float32), clip_norm, noise_multiplier, np.random.default_rng(3))
    assert noisy.std() == pytest.approx(noise_multiplier * clip_norm, rel=0.01)


def test_local_dp_clips_before_noising():
    update = np.full(100, 10.0)
    result = local_dp(update, 2.0, 0.0, np.random.default_rng(0))
    assert np.linalg.norm(result) == pytest.approx(2.0)
    np.testing.assert_allclose(result / np.linalg.norm(result), update / np.linalg.norm(update))


# --- adaptive clipping ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("unclipped, factor", [(50, math.exp(-0.2 * (1 - 0.3))), (0, math.exp(0.2 * 0.3))],
                         ids=["nothing-clipped-shrinks", "everything-clipped-grows"])
def test_adaptive_clip_moves_geometrically_by_the_unclipped_fraction(unclipped, factor):
    """C ← C·exp(−η_C·(b − γ)): b = 1 shrinks by exp(−η_C(1 − γ)), b = 0 grows by exp(η_C γ), every round."""
    config = AdaptiveClipping(target_quantile=0.3, clip_lr=0.2, count_noise=0.0)
    clip = AdaptiveClip(config, clip_norm=2.0)
    rng = np.random.default_rng(0)
    for round_index in range(1, 6):
        new = clip.update(unclipped_count=unclipped, num_updates=50, expected_cohort=50, rng=rng)
        assert new == pytest.approx(2.0 * factor**round_index, rel=1e-12)
        assert clip.clip_norm == new


def test_adaptive_clip_counts_centred_bits_against_the_expected_cohort():
    # b̃ = (Σ(b_i − ½))/m + ½: 10 unclipped of 10 updates with m = 20 gives b̃ = 0.75.
    clip = AdaptiveClip(AdaptiveClipping(target_quantile=0.5, clip_lr=0.2, count_noise=0.0), clip_norm=1.0)
    new = clip.update(unclipped_count=10, num_updates=10, expected_cohort=20, rng=np.random.default_rng(0))
    assert new == pytest.approx(math.exp(-0.2 * (0.75 - 0.5)))


def test_adaptive_clip_converges_to_the_target_quantile_of_the_norms():
    rng = np.random.default_rng(5)
    config = AdaptiveClipping(target_quantile=0.5, clip_lr=0.2)
    clip = AdaptiveClip(config, clip_norm=0.01)
    for _ in range(300):
        norms = rng.lognormal(0.0, 0.5, size=100)  # median norm 1
        clip.update(int((norms <= clip.clip_norm).sum()), 100, 100, rng)
    assert clip.clip_norm == pytest.approx(1.0, rel=0.15)


def test_adaptive_clip_rejects_impossible_counts():
    clip = AdaptiveClip(AdaptiveClipping(), clip_norm=1.0)
    with pytest.raises(ValueError, match="unclipped_count"):
        clip.update(11, 10, 10, np.random.default_rng(0))


def test_effective_noise_multiplier_matches_the_composition_formula():
    z, count_std = 1.2, 3.0
    z_update = effective_noise_multiplier(z, count_std, expected_cohort=100)
    assert z_update == pytest.approx((z**-2 - (2 * count_std) ** -2) ** -0.5)
    assert z_update > z
    # Composed with the count query (noise multiplier 2σ_b) it gives back the budgeted z.
    assert (z_update**-2 + (2 * count_std) ** -2) ** -0.5 == pytest.approx(z)


def test_effective_noise_multiplier_defaults_count_noise_to_a_twentieth_of_the_cohort():
    assert effective_noise_multiplier(1.0, None, expected_cohort=100) == pytest.approx((1 - 1 / 100) ** -0.5)
    assert effective_noise_multiplier(0.0, None, expected_cohort=100) == 0.0


@pytest.mark.parametrize("z, count_noise, cohort", [(1.0, 0.5, 100), (1.0, 0.0, 100), (1.0, None, 10), (3.0, 1.0, 100)])
def test_effective_noise_multiplier_raises_when_undefined(z, count_noise, cohort):
    with pytest.raises(ValueError, match="too small"):
        effective_noise_multiplier(z, count_noise, cohort)


def test_config_gives_the_update_noise_multiplier():
    assert Privacy(noise_multiplier=1.0, clip_norm=1.0).update_noise_multiplier(10) == 1.0
    adaptive = Privacy(noise_multiplier=1.0, clip_norm=1.0, adaptive={"count_noise": 2.0})
    assert adaptive.update_noise_multiplier(10) == pytest.approx((1 - 1 / 16) ** -0.5)


# --- accounting -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample_rate, noise_multiplier, steps, delta",
    [(0.01, 1.1, 1000, 1e-5), (0.1, 0.8, 50, 1e-6), (0.05, 2.0, 300, 1e-5), (1.0, 5.0, 10, 1e-3)],
)
def test_epsilon_equals_opacus(sample_rate, noise_multiplier, steps, delta):
    expected = opacus_epsilon([(sample_rate, noise_multiplier, steps)], delta)
    assert epsilon(sample_rate, noise_multiplier, steps, delta) == pytest.approx(expected, rel=1e-9)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    by_rounds = [epsilon(0.05, 1.0, steps, 1e-5) for steps in (1, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [epsilon(0.05, z, 100, 1e-5) for z in (0.7, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4


def test_epsilon_edge_cases():
    assert epsilon(0.1, 0.0, 5, 1e-5) == math.inf
    assert epsilon(0.1, 1.0, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
    "args", [(0.0, 1.0, 1, 1e-5), (1.5, 1.0, 1, 1e-5), (0.1, -1.0, 1, 1e-5), (0.1, 1.0, -1, 1e-5), (0.1, 1.0, 1, 1.0)]
)
def test_epsilon_rejects_impossible_parameters(args):
    with pytest.raises(ValueError):
        epsilon(*args)


def test_ledger_after_k_rounds_equals_epsilon_and_opacus():
    ledger = PrivacyLedger(delta=1e-5)
    assert ledger.epsilon() == 0.0
    for steps in range(1, 31):
        spent = ledger.step(0.02, 1.3)
        assert spent == pytest.approx(epsilon(0.02, 1.3, steps, 1e-5), rel=1e-12)
    assert ledger.steps == 30
    assert ledger.epsilon() == pytest.approx(opacus_epsilon([(0.02, 1.3, 30)], 1e-5), rel=1e-9)


def test_ledger_composes_rounds_with_different_rates_and_noise():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.step(0.02, 1.3, rounds=20)
    ledger.step(0.05, 1.0, rounds=10)
    ledger.step(0.02, 1.3, rounds=5)
    expected = opacus_epsilon([(0.02, 1.3, 20), (0.05, 1.0, 10), (0.02, 1.3, 5)], 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert ledger.history == {(0.02, 1.3): 25, (0.05, 1.0): 10}


def test_ledger_peeks_without_recording_and_knows_when_the_budget_is_spent():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.step(0.05, 1.0, rounds=10)
    after_ten, after_eleven = (opacus_epsilon([(0.05, 1.0, k)], 1e-5) for k in (10, 11))
    target = (after_ten + after_eleven) / 2
    assert ledger.epsilon_after(0.05, 1.0) == pytest.approx(after_eleven, rel=1e-9)
    assert ledger.steps == 10
    assert not ledger.exhausted(target)
    ledger.step(0.05, 1.0)
    assert ledger.exhausted(target)


def test_ledger_without_noise_is_exhausted_at_once():
    ledger = PrivacyLedger(delta=1e-5)
    ledger.step(0.1, 0.0)
    assert ledger.epsilon() == math.inf and ledger.exhausted(100.0)


# --- config ---------------------------------------------------------------------------------------------------


def test_config_defaults():
    config = Privacy(noise_multiplier=1.0, clip_norm=0.5)
    assert (config.mode, config.delta, config.target_epsilon, config.on_budget, config.adaptive) == (
        "central", 1e-5, None, "stop", None)
    adaptive = AdaptiveClipping()
    assert (adaptive.target_quantile, adaptive.clip_lr, adaptive.count_noise) == (0.5, 0.2, None)


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"delta": -1e-5}, "delta"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"mode": "shuffle"}, "mode"),
        ({"noise": 1.0}, "noise"),
        ({"adaptive": {"target_quantile": 1.0}}, "target_quantile"),
        ({"adaptive": {"clip_lr": 0.0}}, "clip_lr"),
        ({"adaptive": {"count_noise": -1.0}}, "count_noise"),
    ],
)
def test_config_rejects_bad_values(fields, field_name):
    with pytest.raises(pydantic.ValidationError, match=field_name):
        Privacy(**({"noise_multiplier": 1.0, "clip_norm": 1.0} | fields))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"noise_multiplier": 0.0, "target_epsilon": 2.0}, "target_epsilon needs noise_multiplier > 0"),
        ({"mode": "local", "adaptive": {}}, "adaptive clipping needs mode central"),
        ({"noise_multiplier": 2.0, "adaptive": {"count_noise": 1.0}}, "2·σ_b > z"),
    ],
)
def test_config_rejects_inconsistent_sections(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        Privacy(**({"noise_multiplier": 1.0, "clip_norm": 1.0} | fields))


def test_config_is_frozen():
    config = Privacy(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(pydantic.ValidationError):
        config.noise_multiplier = 0.0  # type: ignore[misc]


# --- a run's server-side DP and accountant ----------------------------------------------------------------------


def test_central_dp_ignores_weights_and_noises_the_mean_with_z_s_over_m():
    config = Privacy(noise_multiplier=1.5, clip_norm=2.0)
    dp = CentralDP(config, expected_cohort=40)
    assert dp.noise_std == pytest.approx(1.5 * 2.0 / 40)
    noisy = dp.aggregate(np.zeros((25, 100_000), dtype=np.float32), np.random.default_rng(0))
    assert noisy.std() == pytest.approx(dp.noise_std, rel=0.02)
    assert dp.clip_norm == 2.0  # fixed clipping never moves


def test_central_dp_with_adaptive_clipping_clips_at_the_old_bound_then_moves_it():
    config = Privacy(noise_multiplier=0.0, clip_norm=1.0,
                     adaptive=AdaptiveClipping(target_quantile=0.5, clip_lr=0.2, count_noise=0.0))
    dp = CentralDP(config, expected_cohort=4)
    updates = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.5], [6.0, 8.0]], dtype=np.float32)  # norms 5, .5, .5, 10
    mean = dp.aggregate(updates, np.random.default_rng(0))
    np.testing.assert_allclose(mean, reference_clip(updates, 1.0).sum(axis=0) / 4, rtol=1e-6)
    # Two of four unclipped: b = 0.5 = γ, so C stays; then all four under the bound: C shrinks by exp(−0.2·0.5).
    assert dp.clip_norm == pytest.approx(1.0)
    dp.aggregate(updates * 0.01, np.random.default_rng(0))
    assert dp.clip_norm == pytest.approx(math.exp(-0.2 * 0.5))
    assert dp.state_dict()["clip_norm"] == pytest.approx(dp.clip_norm)


def test_central_dp_noise_multiplier_on_the_updates_pays_for_the_count_under_adaptive_clipping():
    config = Privacy(noise_multiplier=1.0, clip_norm=1.0, adaptive=AdaptiveClipping(count_noise=2.0))
    dp = CentralDP(config, expected_cohort=50)
    assert dp.update_noise_multiplier == pytest.approx(effective_noise_multiplier(1.0, 2.0, 50))
    assert dp.update_noise_multiplier > 1.0


def test_central_accountant_charges_each_round_at_its_sampling_rate():
    config = Privacy(noise_multiplier=1.1, clip_norm=1.0)
    accountant = RunAccountant(config, fleet_size=100)
    rates = [0.1, 0.1, 0.2, 0.1]
    for step, rate in enumerate(rates, start=1):
        spent = accountant.charge(np.arange(10), rate, step)
        expected = opacus_epsilon([(q, 1.1, 1) for q in rates[:step]], 1e-5)
        assert spent == pytest.approx(expected, rel=1e-9)
    assert accountant.charge(np.zeros(0, np.int64), 0.1, 5) == spent  # nobody released anything
    np.testing.assert_array_equal(accountant.state_dict()["rounds"], [[0.1, 1.1, 3], [0.2, 1.1, 1]])


def test_budget_stops_before_the_round_that_would_exceed_it_and_warn_only_records_it():
    first, second = (opacus_epsilon([(0.1, 1.1, k)], 1e-5) for k in (1, 2))
    target = (first + second) / 2
    stop = RunAccountant(Privacy(noise_multiplier=1.1, clip_norm=1.0, target_epsilon=target), 100)
    warn = RunAccountant(Privacy(noise_multiplier=1.1, clip_norm=1.0, target_epsilon=target, on_budget="warn"), 100)
    cohort = np.arange(10)
    for accountant in (stop, warn):
        assert accountant.allows(cohort, 0.1)
        accountant.charge(cohort, 0.1, 1)
    assert not stop.allows(cohort, 0.1) and stop.allows(np.zeros(0, np.int64), 0.1)
    assert warn.allows(cohort, 0.1)
    warn.charge(cohort, 0.1, 2)
    assert warn.spent == pytest.approx(second) and warn.over_budget_at == 2 and stop.over_budget_at is None


def test_local_accountant_reports_the_sensor_with_the_most_releases_without_amplification():
    config = Privacy(mode="local", noise_multiplier=2.0, clip_norm=1.0)
    accountant = RunAccountant(config, fleet_size=5)
    accountant.charge(np.array([0, 1]), 0.4, 1)
    assert accountant.spent == pytest.approx(opacus_epsilon([(1.0, 2.0, 1)], 1e-5), rel=1e-9)
    # Sensor 1 releases twice in one step (two short tasks): three releases in all.
    assert accountant.epsilon_after(np.array([1, 1, 2]), 0.4) == pytest.approx(epsilon(1.0, 2.0, 3, 1e-5))
    accountant.charge(np.array([1, 1, 2]), 0.4, 2)
    np.testing.assert_array_equal(accountant.state_dict()["releases"], [1, 3, 1, 0, 0])
    assert accountant.spent == pytest.approx(opacus_epsilon([(1.0, 2.0, 3)], 1e-5), rel=1e-9)

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raysim.errors import AggregationError
from raysim.strategies.robust import (
    AGGREGATORS,
    BulyanConfig,
    KrumConfig,
    MeanConfig,
    MedianConfig,
    TrimmedMeanConfig,
    bulyan,
    coordinate_median,
    krum,
    krum_select,
    norm_clip,
    row_norms,
    trimmed_mean,
)

modest = settings(max_examples=50, deadline=None)
finite32 = st.floats(-1e3, 1e3, width=32)
finite64 = st.floats(-1e3, 1e3)
# Integer-valued floats keep every squared distance exact, so Krum scores compare exactly.
small_integers = st.integers(-50, 50).map(float)


def update_arrays(dtype=np.float32, rows=st.integers(1, 12), elements=finite32):
    return arrays(dtype, st.tuples(rows, st.integers(1, 20)), elements=elements)


@st.composite
def generic_updates(draw, rows):
    """Gaussian rows: no two Krum scores or coordinate distances tie (with probability one)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.normal(size=(draw(rows), draw(st.integers(1, 20))))


def reference_krum_scores(updates, num_byzantine):
    """Blanchard et al.'s score, by its definition: squared distances to the n−f−2 nearest other rows."""
    rows = updates.astype(np.float64)
    n = len(rows)
    scores = []
    for i in range(n):
        distances = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[: n - num_byzantine - 2]))
    return np.array(scores)


def reference_bulyan(updates, num_byzantine):
    """El Mhamdi et al.'s rule, by its definition, with loops (one neighbour at least in small pools)."""
    rows = updates.astype(np.float64)
    pool, chosen = list(range(len(rows))), []
    for _ in range(len(rows) - 2 * num_byzantine):
        neighbours = min(max(len(pool) - num_byzantine - 2, 1), len(pool) - 1)
        scores = [
            sum(sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in pool if j != i)[:neighbours]) for i in pool
        ]
        chosen.append(pool.pop(int(np.argmin(scores))))
    beta = len(chosen) - 2 * num_byzantine
    result = []
    for column in rows[chosen].T:
        median = np.median(column)
        closest = sorted(column.tolist(), key=lambda value: (abs(value - median), value))[:beta]
        result.append(np.mean(closest))
    return np.array(result)


def under_attack(num_honest, num_byzantine, dim, attack, seed=0):
    """Honest N(0, 1) rows and ``num_byzantine`` attacker rows of 1e6 scale, at random positions."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(size=(num_honest, dim)).astype(np.float32)
    if attack == "same":  # colluding attackers all send one point
        byzantine = np.full((num_byzantine, dim), 1e6, np.float32)
    elif attack == "opposite":
        byzantine = np.full((num_byzantine, dim), -1e6, np.float32)
    else:  # independent random signs per coordinate
        byzantine = (1e6 * rng.choice([-1.0, 1.0], size=(num_byzantine, dim))).astype(np.float32)
    order = rng.permutation(num_honest + num_byzantine)
    updates = np.concatenate([honest, byzantine])[order]
    is_honest = order < num_honest
    return updates, honest, is_honest


def assert_within(result, rows):
    assert (result >= rows.min(axis=0)).all() and (result <= rows.max(axis=0)).all()


ATTACKS = ["same", "opposite", "random"]


# --- behaviour under attack -------------------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("num_honest, num_byzantine", [(2, 1), (4, 3), (7, 3), (10, 9)])
def test_median_stays_in_honest_range_with_a_byzantine_minority(num_honest, num_byzantine, attack):
    updates, honest, _ = under_attack(num_honest, num_byzantine, dim=30, attack=attack)
    assert_within(coordinate_median(updates), honest)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("num_honest, num_byzantine, beta", [(8, 2, 0.2), (7, 3, 0.3), (17, 3, 0.15), (6, 0, 0.1)])
def test_trimmed_mean_stays_in_honest_range_when_it_trims_every_attacker(num_honest, num_byzantine, beta, attack):
    updates, honest, _ = under_attack(num_honest, num_byzantine, dim=30, attack=attack)
    assert math.floor(beta * len(updates)) >= num_byzantine
    assert_within(trimmed_mean(updates, beta), honest)


def test_the_attack_drags_the_plain_mean_out_of_honest_range():
    # Control for the tests above: the same attack defeats a non-robust rule.
    updates, honest, _ = under_attack(8, 2, dim=30, attack="same")
    assert (trimmed_mean(updates, 0.0) > honest.max(axis=0)).all()


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("num_honest, num_byzantine", [(3, 0), (4, 1), (8, 3), (12, 5)])
def test_krum_and_multi_krum_select_only_honest_updates(num_honest, num_byzantine, attack):
    updates, honest, is_honest = under_attack(num_honest, num_byzantine, dim=30, attack=attack)
    selected = krum_select(updates, num_byzantine, num_selected=num_honest)
    assert is_honest[selected].all()
    assert any((krum(updates, num_byzantine) == row).all() for row in honest)
    assert_within(krum(updates, num_byzantine, num_selected=num_honest), honest)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("num_honest, num_byzantine", [(3, 0), (6, 1), (9, 2), (12, 3)])
def test_bulyan_stays_in_honest_range_under_attack(num_honest, num_byzantine, attack):
    updates, honest, _ = under_attack(num_honest, num_byzantine, dim=30, attack=attack)
    assert_within(bulyan(updates, num_byzantine), honest)


# --- exact cases ------------------------------------------------------------------------------


@given(updates=update_arrays(np.float64, elements=finite64))
@modest
def test_trimmed_mean_without_trimming_is_the_mean(updates):
    expected = updates.mean(axis=0)
    np.testing.assert_allclose(trimmed_mean(updates, 0.0), expected, rtol=1e-12, atol=1e-9)
    small_beta = 0.99 / len(updates)  # floor(beta·n) = 0 as well
    np.testing.assert_allclose(trimmed_mean(updates, min(small_beta, 0.49)), expected, rtol=1e-12, atol=1e-9)


@given(row=arrays(np.float32, st.integers(1, 30), elements=finite32), copies=st.integers(0, 5))
@modest
def test_median_of_identical_rows_is_that_row(row, copies):
    updates = np.tile(row, (2 * copies + 1, 1))
    np.testing.assert_array_equal(coordinate_median(updates), row)


def test_median_and_trimmed_mean_follow_their_definitions():
    updates = np.array([[1.0, -5.0], [3.0, 0.0], [2.0, 100.0], [50.0, 1.0], [-7.0, 2.0]])
    np.testing.assert_array_equal(coordinate_median(updates), [2.0, 1.0])
    # beta = 0.2, n = 5: drop one value per side -> (1 + 2 + 3) / 3, (0 + 1 + 2) / 3
    np.testing.assert_allclose(trimmed_mean(updates, 0.2), [2.0, 1.0])


@given(updates=update_arrays(rows=st.integers(3, 12)), data=st.data())
@modest
def test_krum_returns_one_of_its_inputs_exactly(updates, data):
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 2))
    result = krum(updates, num_byzantine)
    assert result.dtype == updates.dtype
    assert any((result == row).all() for row in updates)


@given(updates=update_arrays(np.float64, rows=st.integers(3, 12), elements=finite64))
@modest
def test_multi_krum_selecting_everything_is_the_mean(updates):
    np.testing.assert_allclose(krum(updates, 0, num_selected=len(updates)), updates.mean(axis=0), rtol=1e-12, atol=1e-9)


@given(updates=update_arrays(np.float64, rows=st.integers(3, 12), elements=small_integers), data=st.data())
@modest
def test_krum_selects_the_lowest_scores_of_its_definition(updates, data):
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 2))
    num_selected = data.draw(st.integers(1, len(updates)))
    scores = reference_krum_scores(updates, num_byzantine)
    selected = krum_select(updates, num_byzantine, num_selected)
    assert len(set(selected.tolist())) == num_selected
    np.testing.assert_array_equal(np.sort(scores[selected]), np.sort(scores)[:num_selected])
    tied_best = np.flatnonzero(scores == scores.min())
    assert selected[0] == tied_best[0]  # ties go to the lowest index


@given(updates=update_arrays(np.float64, rows=st.integers(3, 16), elements=small_integers), data=st.data())
@modest
def test_bulyan_follows_its_definition(updates, data):
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 4))
    np.testing.assert_allclose(bulyan(updates, num_byzantine), reference_bulyan(updates, num_byzantine), rtol=1e-12)


@given(updates=update_arrays(np.float64, rows=st.integers(3, 12), elements=finite64))
@modest
def test_bulyan_without_byzantine_updates_is_the_mean(updates):
    # f = 0: θ = n selects every update and β = n keeps every value.
    np.testing.assert_allclose(bulyan(updates, 0), updates.mean(axis=0), rtol=1e-12, atol=1e-9)


# --- guards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, num_byzantine", [(2, 0), (4, 1), (6, 2), (1, 0)])
def test_krum_needs_more_than_2f_plus_2_updates(n, num_byzantine):
    updates = np.ones((n, 3), np.float32)
    with pytest.raises(AggregationError, match=rf"Krum needs n > 2f \+ 2, got n={n}, f={num_byzantine}"):
        krum(updates, num_byzantine)
    with pytest.raises(AggregationError, match=r"Krum needs n > 2f \+ 2"):
        krum_select(updates, num_byzantine, 1)
    krum(np.ones((2 * num_byzantine + 3, 3)), num_byzantine)  # one more is enough


@pytest.mark.parametrize("num_selected", [0, -1, 8])
def test_krum_rejects_num_selected_outside_1_to_n(num_selected):
    with pytest.raises(AggregationError, match="num_selected"):
        krum(np.ones((7, 3)), 1, num_selected=num_selected)


@pytest.mark.parametrize("n, num_byzantine", [(2, 0), (6, 1), (10, 2), (14, 3)])
def test_bulyan_needs_at_least_4f_plus_3_updates(n, num_byzantine):
    with pytest.raises(AggregationError, match=rf"Bulyan needs n >= 4f \+ 3, got n={n}, f={num_byzantine}"):
        bulyan(np.ones((n, 3)), num_byzantine)
    bulyan(np.ones((4 * num_byzantine + 3, 3)), num_byzantine)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_rejects_beta_outside_0_to_half(beta):
    with pytest.raises(AggregationError, match=rf"beta={beta}.*n=6"):
        trimmed_mean(np.ones((6, 3)), beta)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_norm_clip_rejects_a_non_positive_bound(max_norm):
    with pytest.raises(AggregationError, match="max_norm"):
        norm_clip(np.ones((2, 3)), max_norm)


KERNELS = {
    "coordinate_median": coordinate_median,
    "trimmed_mean": lambda u: trimmed_mean(u, 0.1),
    "krum": lambda u: krum(u, 0),
    "bulyan": lambda u: bulyan(u, 0),
    "norm_clip": lambda u: norm_clip(u, 1.0),
}


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_kernels_reject_empty_input(kernel):
    with pytest.raises(AggregationError, match="at least one update"):
        kernel(np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_kernels_reject_non_finite_updates(kernel, bad):
    updates = np.ones((5, 4), np.float32)
    updates[3, 2] = bad
    with pytest.raises(AggregationError, match=r"non-finite.*rows \[3\]"):
        kernel(updates)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_kernels_reject_input_that_is_not_2d(kernel, shape):
    with pytest.raises(AggregationError, match=r"shape \(n, d\)"):
        kernel(np.ones(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_kernels_return_the_input_dtype(kernel, dtype):
    updates = np.random.default_rng(1).normal(size=(7, 5)).astype(dtype)
    assert kernel(updates).dtype == dtype


# --- norm clipping ----------------------------------------------------------------------------


@given(updates=update_arrays(), max_norm=st.floats(1e-3, 1e4))
@modest
def test_norm_clip_bounds_norms_keeps_short_rows_and_directions(updates, max_norm):
    clipped = norm_clip(updates, max_norm)
    norms, new_norms = row_norms(updates), row_norms(clipped)
    assert clipped.dtype == updates.dtype
    assert (new_norms <= max_norm * (1 + 1e-6)).all()
    short = norms <= max_norm
    assert clipped[short].tobytes() == updates[short].tobytes()
    long = ~short
    np.testing.assert_allclose(new_norms[long], max_norm, rtol=1e-6)
    directions = updates[long] / norms[long, None]
    np.testing.assert_allclose(clipped[long] / new_norms[long, None], directions, rtol=1e-5, atol=1e-6)


@given(updates=update_arrays(), max_norm=st.floats(1e-3, 1e4))
@modest
def test_norm_clip_is_idempotent(updates, max_norm):
    once = norm_clip(updates, max_norm)
    np.testing.assert_allclose(norm_clip(once, max_norm), once, rtol=1e-6, atol=0)


# --- properties: row order, range, translation ------------------------------------------------


@given(updates=update_arrays(), data=st.data())
@modest
def test_median_and_trimmed_mean_ignore_row_order(updates, data):
    order = data.draw(st.permutations(range(len(updates))))
    beta = data.draw(st.floats(0, 0.49))
    np.testing.assert_array_equal(coordinate_median(updates[order]), coordinate_median(updates))
    np.testing.assert_array_equal(trimmed_mean(updates[order], beta), trimmed_mean(updates, beta))


# Krum ignores row order unless scores tie; ties go to the lower index. A score over a single
# neighbour always ties (a mutually nearest pair shares its distance), which is Krum with n = 3,
# f = 0, and Bulyan's last picks for f = 1, 2; Gaussian rows avoid every other tie.


@given(updates=generic_updates(st.integers(4, 12)), data=st.data())
@modest
def test_krum_ignores_row_order(updates, data):
    order = data.draw(st.permutations(range(len(updates))))
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 2))
    num_selected = data.draw(st.integers(1, len(updates)))
    np.testing.assert_array_equal(
        krum(updates[order], num_byzantine, num_selected), krum(updates, num_byzantine, num_selected)
    )


@given(updates=generic_updates(st.integers(3, 20)), data=st.data())
@modest
def test_bulyan_ignores_row_order(updates, data):
    order = data.draw(st.permutations(range(len(updates))))
    num_byzantine = data.draw(st.sampled_from([0, *range(3, (len(updates) - 3) // 4 + 1)]))
    np.testing.assert_array_equal(bulyan(updates[order], num_byzantine), bulyan(updates, num_byzantine))


@given(updates=update_arrays(), data=st.data())
@modest
def test_norm_clip_acts_on_each_row_alone(updates, data):
    order = data.draw(st.permutations(range(len(updates))))
    np.testing.assert_array_equal(norm_clip(updates[order], 1.0), norm_clip(updates, 1.0)[order])


@given(updates=update_arrays(), beta=st.floats(0, 0.49))
@modest
def test_median_and_trimmed_mean_stay_inside_coordinate_range(updates, beta):
    assert_within(coordinate_median(updates), updates)
    assert_within(trimmed_mean(updates, beta), updates)


@given(updates=update_arrays(rows=st.integers(3, 12)), data=st.data())
@modest
def test_krum_stays_inside_coordinate_range(updates, data):
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 2))
    num_selected = data.draw(st.integers(1, len(updates)))
    assert_within(krum(updates, num_byzantine, num_selected), updates)


@given(updates=update_arrays(rows=st.integers(3, 16)), data=st.data())
@modest
def test_bulyan_stays_inside_coordinate_range(updates, data):
    assert_within(bulyan(updates, data.draw(st.integers(0, (len(updates) - 3) // 4))), updates)


@given(updates=update_arrays(np.float64, elements=finite64), data=st.data())
@modest
def test_median_and_trimmed_mean_shift_with_the_inputs(updates, data):
    shift = data.draw(arrays(np.float64, updates.shape[1], elements=finite64))
    beta = data.draw(st.floats(0, 0.49))
    np.testing.assert_allclose(coordinate_median(updates + shift), coordinate_median(updates) + shift, atol=1e-9)
    np.testing.assert_allclose(trimmed_mean(updates + shift, beta), trimmed_mean(updates, beta) + shift, atol=1e-9)


@given(updates=update_arrays(np.float64, rows=st.integers(3, 16), elements=small_integers), data=st.data())
@modest
def test_krum_and_bulyan_shift_with_the_inputs(updates, data):
    shift = data.draw(arrays(np.float64, updates.shape[1], elements=small_integers))
    num_byzantine = data.draw(st.integers(0, (len(updates) - 3) // 2))
    num_selected = data.draw(st.integers(1, len(updates)))
    shifted = krum(updates + shift, num_byzantine, num_selected)
    np.testing.assert_allclose(shifted, krum(updates, num_byzantine, num_selected) + shift, atol=1e-9)
    bulyan_byzantine = num_byzantine // 2  # n ≥ 2f + 3 ≥ 4·⌊f/2⌋ + 3
    np.testing.assert_allclose(
        bulyan(updates + shift, bulyan_byzantine), bulyan(updates, bulyan_byzantine) + shift, atol=1e-9
    )


# --- registry ---------------------------------------------------------------------------------

CONFIGS = [
    (MeanConfig(), 1),
    (MedianConfig(), 1),
    (TrimmedMeanConfig(beta=0.3), 1),
    (KrumConfig(num_byzantine=2), 7),  # n > 2f + 2
    (KrumConfig(num_byzantine=1, num_selected=9), 9),  # Multi-Krum also needs n ≥ m
    (BulyanConfig(num_byzantine=2), 11),  # n ≥ 4f + 3
]


@pytest.mark.parametrize("config, min_updates", CONFIGS, ids=[config.name for config, _ in CONFIGS])
def test_aggregators_build_by_name_and_work_from_min_updates(config, min_updates):
    aggregator = AGGREGATORS.build(AGGREGATORS.entry(config.name).config.model_validate(config.model_dump()))
    assert aggregator.min_updates() == min_updates
    rng = np.random.default_rng(2)
    updates = rng.normal(size=(min_updates, 4)).astype(np.float32)
    weights = rng.integers(1, 50, size=min_updates)
    assert aggregator.aggregate(updates, weights).shape == (4,)
    if min_updates > 1:
        with pytest.raises(AggregationError):
            aggregator.aggregate(updates[:-1], weights[:-1])


def test_each_aggregator_applies_its_kernel():
    rng = np.random.default_rng(3)
    updates = rng.normal(size=(11, 6))
    weights = rng.integers(1, 50, size=11).astype(np.float64)
    expected = {
        "mean": (weights / weights.sum()) @ updates,
        "median": coordinate_median(updates),
        "trimmed_mean": trimmed_mean(updates, 0.1),
        "krum": krum(updates, 2, 3),
        "bulyan": bulyan(updates, 2),
    }
    configs = {
        "mean": {"name": "mean"},
        "median": {"name": "median"},
        "trimmed_mean": {"name": "trimmed_mean"},
        "krum": {"name": "krum", "num_byzantine": 2, "num_selected": 3},
        "bulyan": {"name": "bulyan", "num_byzantine": 2},
    }
    assert sorted(configs) == AGGREGATORS.names()
    parse = pydantic.TypeAdapter(AGGREGATORS.config_union()).validate_python
    for name, config in configs.items():
        np.testing.assert_allclose(AGGREGATORS.build(parse(config)).aggregate(updates, weights), expected[name])


@pytest.mark.parametrize(
    "config",
    [
        {"name": "trimmed_mean", "beta": 0.5},
        {"name": "krum"},  # f has no default: the scenario must say how many attackers to tolerate
        {"name": "krum", "num_byzantine": -1},
        {"name": "krum", "num_byzantine": 1, "num_selected": 0},
        {"name": "bulyan", "num_byzantine": 1, "extra": 2},
        {"name": "geomedian"},
    ],
)
def test_bad_aggregator_configs_are_rejected(config):
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(AGGREGATORS.config_union()).validate_python(config)


def test_aggregator_configs_are_frozen():
    config = KrumConfig(num_byzantine=1)
    with pytest.raises(pydantic.ValidationError):
        config.num_byzantine = 3

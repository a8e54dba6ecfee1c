from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from raysim.attacks import Attack, attack_updates, choose_attackers, flip_labels
from raysim.streams import ATTACK, stream

KINDS = ["sign_flip", "gaussian", "scale", "alie", "label_flip", "nan"]


def _updates(n: int, d: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def _mask(n: int, malicious_rows) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[list(malicious_rows)] = True
    return mask


# --------------------------------------------------------------------------- choose_attackers


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(100, 0.2, 20), (1000, 0.33, 330), (10, 0.25, 3), (7, 0.5, 4), (3, 0.1, 0), (1, 0.6, 1)],
)
def test_choose_attackers_picks_the_nearest_whole_number_of_sensors(n, fraction, expected):
    mask = choose_attackers(7, np.arange(n), fraction)
    assert mask.dtype == bool and mask.shape == (n,)
    assert mask.sum() == expected


def test_fraction_zero_chooses_nobody():
    assert not choose_attackers(7, np.arange(500), 0.0).any()
    assert choose_attackers(7, np.arange(0), 0.3).shape == (0,)


def test_choose_attackers_is_deterministic_and_depends_on_the_seed():
    ids = np.arange(200)
    first = choose_attackers(3, ids, 0.3)
    np.testing.assert_array_equal(first, choose_attackers(3, ids, 0.3))
    assert not np.array_equal(first, choose_attackers(4, ids, 0.3))


@settings(max_examples=50, deadline=None)
@given(
    ids=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=60, unique=True),
    fraction=st.floats(0, 0.99),
    seed=st.integers(0, 2**32),
    order_seed=st.integers(0, 1000),
)
def test_same_fleet_in_any_order_gives_the_same_attackers(ids, fraction, seed, order_seed):
    ids = np.array(ids)
    shuffled = np.random.default_rng(order_seed).permutation(ids)
    chosen = set(ids[choose_attackers(seed, ids, fraction)].tolist())
    assert chosen == set(shuffled[choose_attackers(seed, shuffled, fraction)].tolist())


def test_growing_the_fraction_keeps_earlier_attackers():
    ids = np.random.default_rng(1).choice(10**6, size=300, replace=False)
    previous = np.zeros(len(ids), dtype=bool)
    for fraction in np.linspace(0, 0.95, 20):
        mask = choose_attackers(11, ids, float(fraction))
        assert (mask >= previous).all(), f"fraction {fraction} dropped an earlier attacker"
        previous = mask
    assert previous.sum() == round(0.95 * 300)


def test_choose_attackers_rejects_duplicates_and_bad_fractions():
    with pytest.raises(ValueError):
        choose_attackers(0, np.array([1, 2, 2]), 0.5)
    with pytest.raises(ValueError):
        choose_attackers(0, np.arange(5), 1.0)


# --------------------------------------------------------------------------- attack_updates


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    updates=arrays(
        st.sampled_from([np.float32, np.float64]),
        st.tuples(st.integers(1, 12), st.integers(1, 20)),
        elements=st.floats(-1e3, 1e3, width=32),
    ),
    data=st.data(),
)
def test_honest_rows_are_unchanged_bit_for_bit(kind, updates, data):
    malicious = data.draw(arrays(np.bool_, len(updates)))
    original = updates.copy()
    out = attack_updates(Attack(kind=kind, fraction=0.2), updates, malicious, stream(0, ATTACK, 1))
    assert out.dtype == updates.dtype and out.shape == updates.shape
    assert out[~malicious].tobytes() == original[~malicious].tobytes()
    np.testing.assert_array_equal(updates, original)  # input not modified
    assert out is not updates


@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_sign_flip_sends_minus_scale_times_the_update(scale):
    updates = _updates(6, 40)
    malicious = _mask(6, [1, 4])
    out = attack_updates(Attack(kind="sign_flip", fraction=0.3, scale=scale), updates, malicious, stream(0, ATTACK, 0))
    np.testing.assert_allclose(out[malicious], -scale * updates[malicious], rtol=1e-6)
    np.testing.assert_array_equal(out[~malicious], updates[~malicious])


def test_scale_multiplies_the_update():
    updates = _updates(5, 30, dtype=np.float64)
    malicious = _mask(5, [0])
    out = attack_updates(Attack(kind="scale", fraction=0.2, scale=100.0), updates, malicious, stream(0, ATTACK, 0))
    np.testing.assert_allclose(out[0], updates[0] * 100.0, rtol=1e-12)
    np.testing.assert_array_equal(out[1:], updates[1:])


def test_gaussian_sends_noise_of_the_requested_std_whatever_the_updates():
    d = 40_000
    malicious = _mask(4, [0, 2])
    attack = Attack(kind="gaussian", fraction=0.5, std=2.5)
    small = attack_updates(attack, _updates(4, d, seed=1), malicious, stream(5, ATTACK, 3))
    large = attack_updates(attack, 1e6 * _updates(4, d, seed=2), malicious, stream(5, ATTACK, 3))
    noise = small[malicious].astype(np.float64)
    assert abs(noise.mean()) < 0.05
    assert noise.std() == pytest.approx(2.5, rel=0.02)
    # The two malicious rows are independent draws, and the noise ignores the honest updates.
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.03
    np.testing.assert_array_equal(small[malicious], large[malicious])
    other_round = attack_updates(attack, _updates(4, d, seed=1), malicious, stream(5, ATTACK, 4))
    assert not np.array_equal(small[malicious], other_round[malicious])


@pytest.mark.parametrize("tau", [1.0, -0.7, 2.0])
def test_alie_sends_mean_plus_tau_std_of_the_honest_updates(tau):
    updates = _updates(9, 25, seed=3, dtype=np.float64)
    malicious = _mask(9, [2, 5, 8])
    out = attack_updates(Attack(kind="alie", fraction=0.3, tau=tau), updates, malicious, stream(0, ATTACK, 0))
    honest = updates[[0, 1, 3, 4, 6, 7]]
    n = len(honest)
    mean = honest.sum(axis=0) / n
    std = np.sqrt(((honest - mean) ** 2).sum(axis=0) / (n - 1))
    for row in (2, 5, 8):
        np.testing.assert_allclose(out[row], mean + tau * std, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(out[~malicious], updates[~malicious])


def test_alie_with_one_honest_update_sends_that_update():
    updates = _updates(3, 10, seed=4)
    out = attack_updates(Attack(kind="alie", fraction=0.6, tau=3.0), updates, _mask(3, [0, 2]), stream(0, ATTACK, 0))
    np.testing.assert_array_equal(out[0], updates[1])
    np.testing.assert_array_equal(out[2], updates[1])


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_attack_rows_are_entirely_non_finite(value):
    updates = _updates(5, 50)
    malicious = _mask(5, [1, 3])
    out = attack_updates(Attack(kind="nan", fraction=0.4, value=value), updates, malicious, stream(0, ATTACK, 0))
    assert not np.isfinite(out[malicious]).any()
    assert (np.isnan(out[malicious]) if value == "nan" else np.isposinf(out[malicious])).all()
    assert np.isfinite(out[~malicious]).all()


def test_label_flip_leaves_the_updates_alone():
    updates = _updates(4, 8)
    out = attack_updates(Attack(kind="label_flip", fraction=0.5), updates, _mask(4, [0, 1]), stream(0, ATTACK, 0))
    np.testing.assert_array_equal(out, updates)


# --------------------------------------------------------------------------- flip_labels


@settings(max_examples=50, deadline=None)
@given(classes=st.integers(1, 50), data=st.data())
def test_flip_labels_is_an_involution_that_swaps_the_ends(classes, data):
    y = data.draw(arrays(np.int64, st.integers(0, 100), elements=st.integers(0, classes - 1)))
    flipped = flip_labels(y, classes)
    assert flipped.dtype == y.dtype
    assert ((flipped >= 0) & (flipped < classes)).all()
    np.testing.assert_array_equal(flip_labels(flipped, classes), y)
    np.testing.assert_array_equal(flip_labels(np.array([0, classes - 1]), classes), [classes - 1, 0])


def test_flip_labels_rejects_labels_out_of_range():
    with pytest.raises(ValueError):
        flip_labels(np.array([0, 6]), 6)


# --------------------------------------------------------------------------- Attack config


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "sign_flip", "fraction": 1.0},
        {"kind": "sign_flip", "fraction": 1.5},
        {"kind": "sign_flip", "fraction": -0.1},
        {"kind": "backdoor", "fraction": 0.1},
        {"kind": "gaussian", "fraction": 0.1, "std": 0.0},
        {"kind": "scale", "fraction": 0.1, "scale": -2.0},
        {"kind": "nan", "fraction": 0.1, "value": "zero"},
        {"kind": "alie", "fraction": 0.1, "z": 1.0},
        {"fraction": 0.1},
    ],
)
def test_attack_config_rejects_bad_fields(fields):
    with pytest.raises(ValidationError):
        Attack(**fields)


def test_attack_config_is_frozen_with_documented_defaults():
    attack = Attack(kind="alie", fraction=0.25)
    assert (attack.scale, attack.std, attack.tau, attack.value) == (1.0, 1.0, 1.0, "nan")
    with pytest.raises(ValidationError):
        attack.fraction = 0.5  # type: ignore[misc]

"""Update validation: what is rejected before aggregation, and why."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from raysim.strategies.validation import (
    ACCEPTED,
    COSINE_OUTLIER,
    NON_FINITE,
    NORM_OUTLIER,
    UNKNOWN_BASE,
    Validation,
    fingerprint,
    screen,
)


def _honest(count=12, dim=30, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    return (direction + 0.3 * rng.normal(size=(count, dim))).astype(np.float32)


def test_non_finite_updates_are_always_rejected():
    updates = _honest()
    updates[2, 5] = np.nan
    updates[7, 0] = np.inf
    reasons = screen(updates, np.ones(len(updates), bool), Validation())
    assert set(np.flatnonzero(reasons == NON_FINITE)) == {2, 7}
    assert (np.delete(reasons, [2, 7]) == ACCEPTED).all()


def test_updates_from_an_unknown_base_are_rejected():
    updates = _honest()
    known = np.ones(len(updates), bool)
    known[4] = False
    reasons = screen(updates, known, Validation())
    assert reasons[4] == UNKNOWN_BASE and (np.delete(reasons, 4) == ACCEPTED).all()


def test_norm_filter_rejects_a_boosted_update_only_when_enabled():
    updates = _honest()
    updates[3] *= 50
    assert (screen(updates, np.ones(12, bool), Validation()) == ACCEPTED).all()
    reasons = screen(updates, np.ones(12, bool), Validation(norm_zscore=2.5))
    assert reasons[3] == NORM_OUTLIER and (np.delete(reasons, 3) == ACCEPTED).all()


def test_cosine_filter_rejects_a_sign_flipped_update():
    updates = _honest()
    updates[[1, 9]] *= -1
    reasons = screen(updates, np.ones(12, bool), Validation(min_cosine=0.0))
    assert set(np.flatnonzero(reasons == COSINE_OUTLIER)) == {1, 9}
    assert (np.delete(reasons, [1, 9]) == ACCEPTED).all()


def test_filters_need_three_finite_updates_and_skip_rejected_ones():
    updates = _honest(count=3)
    updates[0] = np.nan
    reasons = screen(updates, np.ones(3, bool), Validation(norm_zscore=0.1, min_cosine=0.99))
    assert reasons.tolist() == [NON_FINITE, ACCEPTED, ACCEPTED]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 20), st.integers(1, 12), st.integers(0, 1000))
def test_without_filters_only_bad_rows_are_rejected(count, dim, seed):
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(count, dim)).astype(np.float32)
    bad = rng.random(count) < 0.2
    updates[bad, 0] = np.nan
    known = rng.random(count) < 0.8
    reasons = screen(updates, known, Validation())
    assert ((reasons == NON_FINITE) == bad).all()
    assert ((reasons == UNKNOWN_BASE) == (~bad & ~known)).all()


def test_fingerprint_tells_weight_vectors_apart():
    weights = np.arange(1000, dtype=np.float32)
    changed = weights.copy()
    changed[500] = np.nextafter(changed[500], np.float32(1e9))
    assert fingerprint(weights) == fingerprint(weights.copy())
    assert fingerprint(weights) != fingerprint(changed)
    assert 0 <= fingerprint(weights) < 2**63


def test_bad_filter_settings_are_rejected():
    with pytest.raises(ValidationError):
        Validation(norm_zscore=0)
    with pytest.raises(ValidationError):
        Validation(min_cosine=1.5)

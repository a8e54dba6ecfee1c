"""Invariants of per-sensor preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raysim.fleet import preprocess
from raysim.scenario import Preprocess

windows = arrays(
    np.float32,
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 40)),
    elements=st.floats(-100, 100, width=32),
)


@given(x=windows)
def test_window_one_is_identity(x):
    np.testing.assert_array_equal(preprocess.smooth(x, 1), x)


@given(value=st.floats(-1e3, 1e3), length=st.integers(1, 50), window=st.integers(1, 80))
def test_smoothing_a_constant_is_identity(value, length, window):
    x = np.full((2, 3, length), value, dtype=np.float64)
    np.testing.assert_allclose(preprocess.smooth(x, window), x, rtol=1e-12, atol=1e-9)


@given(x=windows, window=st.integers(1, 50))
def test_smoothing_keeps_shape_dtype_and_range(x, window):
    y = preprocess.smooth(x, window)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y >= x.min(-1, keepdims=True) - 1e-3).all() and (y <= x.max(-1, keepdims=True) + 1e-3).all()


def test_smoothing_matches_hand_computed_centred_average():
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    # window 3: edges average the two available samples
    np.testing.assert_allclose(preprocess.smooth(x, 3), [1.5, 2.0, 3.0, 17 / 3, 7.0])
    # window 2 (even): current and next sample
    np.testing.assert_allclose(preprocess.smooth(x, 2), [1.5, 2.5, 3.5, 7.0, 10.0])


def test_smoothing_a_linear_ramp_is_identity_inside():
    x = np.arange(20, dtype=np.float64)
    np.testing.assert_allclose(preprocess.smooth(x, 5)[2:-2], x[2:-2])


def test_smoothing_window_must_be_positive():
    with pytest.raises(ValueError):
        preprocess.smooth(np.zeros(4), 0)


@settings(deadline=None)
@given(
    x=arrays(np.float64, st.tuples(st.integers(2, 8), st.integers(1, 5), st.integers(2, 20)), elements=st.floats(-50, 50)),
    scale=st.floats(0.1, 10),
)
def test_zscore_gives_zero_mean_unit_std_per_channel(x, scale):
    x = x * scale + np.arange(x.shape[1])[None, :, None] * 7.0
    z = preprocess.zscore(x)
    assert z.dtype == np.float32
    std = x.std(axis=(0, 2))
    varying = std > 1e-3
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2))[varying], 1, atol=1e-3)


def test_zscore_constant_channel_is_centred_not_divided_by_zero():
    x = np.zeros((4, 2, 8))
    x[:, 0] = 3.0
    x[:, 1] = np.random.default_rng(0).normal(5, 2, size=(4, 8))
    z = preprocess.zscore(x)
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(z[:, 0], 0)


def test_zscore_is_per_channel_not_global():
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(0, 1, (50, 16)), rng.normal(100, 20, (50, 16))], axis=1)
    z = preprocess.zscore(x)
    np.testing.assert_allclose(z.std(axis=(0, 2)), [1, 1], atol=1e-5)


def test_apply_smooths_then_normalizes():
    rng = np.random.default_rng(2)
    x = rng.normal(3, 2, size=(10, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.apply(x, Preprocess()), x)
    smoothed = preprocess.apply(x, Preprocess(smoothing_window=5))
    assert smoothed.std() < x.std()
    both = preprocess.apply(x, Preprocess(smoothing_window=5, zscore=True))
    np.testing.assert_allclose(both, preprocess.zscore(preprocess.smooth(x, 5)), atol=1e-6)
    np.testing.assert_allclose(both.std(axis=(0, 2)), 1, atol=1e-4)

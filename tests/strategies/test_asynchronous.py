import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raysim.errors import AggregationError
from raysim.strategies import STRATEGIES, UpdateBatch
from raysim.strategies.asynchronous import FedAsyncConfig, FedBuffConfig, Staleness, staleness_weight

FUNCTIONS = [
    Staleness(function="constant"),
    Staleness(function="polynomial", a=0.5),
    Staleness(function="polynomial", a=2.0),
    Staleness(function="hinge", a=0.3, b=3),
    Staleness(function="hinge", a=5.0, b=0),
]


@pytest.mark.parametrize("config", FUNCTIONS, ids=lambda c: f"{c.function}-{c.a}-{c.b}")
def test_staleness_weight_is_one_when_fresh_and_never_increases(config):
    tau = np.arange(0, 200)
    s = staleness_weight(tau, config)
    assert s[0] == 1.0
    assert (np.diff(s) <= 0).all()
    assert (s > 0).all()


def test_staleness_functions_follow_their_formulas():
    tau = np.array([0, 1, 3, 8])
    np.testing.assert_allclose(staleness_weight(tau, Staleness(function="polynomial", a=0.5)), 1 / np.sqrt(1 + tau))
    np.testing.assert_allclose(staleness_weight(tau, Staleness(function="hinge", a=0.5, b=2)), [1, 1, 1 / 1.5, 1 / 4])
    with pytest.raises(AggregationError):
        staleness_weight(np.array([-1]), Staleness())


@given(st.integers(1, 8), st.integers(1, 20))
def test_fedbuff_with_fresh_updates_is_the_plain_average(count, dim):
    rng = np.random.default_rng(count * 100 + dim)
    x = rng.normal(size=dim).astype(np.float32)
    deltas = rng.normal(size=(count, dim)).astype(np.float32)
    fedbuff = STRATEGIES.build(FedBuffConfig(buffer_size=count))
    step = fedbuff.pseudo_gradient(x, UpdateBatch(deltas, np.ones(count), staleness=np.zeros(count, int)))
    np.testing.assert_allclose(x + step, x + deltas.mean(0), rtol=1e-5, atol=1e-5)


def test_fedbuff_discounts_stale_updates_and_applies_server_lr():
    x = np.zeros(2, np.float32)
    deltas = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # s(0) = 1, s(3) = 1/2 with a = 0.5: weights 2/3 and 1/3.
    fedbuff = STRATEGIES.build(FedBuffConfig(buffer_size=2, server_lr=0.9, staleness=Staleness(a=0.5)))
    step = fedbuff.pseudo_gradient(x, UpdateBatch(deltas, np.array([5, 500]), staleness=np.array([0, 3])))
    np.testing.assert_allclose(x + step, [0.9 * 2 / 3, 0.9 * 1 / 3], rtol=1e-6)


def test_fedasync_with_alpha_one_and_constant_weight_replaces_the_model():
    rng = np.random.default_rng(0)
    x, base, delta = (rng.normal(size=7).astype(np.float32) for _ in range(3))
    fedasync = STRATEGIES.build(FedAsyncConfig(alpha=1.0, staleness=Staleness(function="constant")))
    step = fedasync.pseudo_gradient(x, UpdateBatch(delta[None], np.array([10]), staleness=np.array([5]),
                                                   base_weights=base[None]))
    np.testing.assert_allclose(x + step, base + delta, rtol=1e-6)


def test_fedasync_mixes_by_alpha_times_staleness_weight():
    x = np.array([1.0], np.float32)
    fedasync = STRATEGIES.build(FedAsyncConfig(alpha=0.5, staleness=Staleness(function="polynomial", a=1.0)))
    step = fedasync.pseudo_gradient(x, UpdateBatch(np.array([[2.0]], np.float32), np.array([1]),
                                                   staleness=np.array([1]), base_weights=np.array([[3.0]], np.float32)))
    np.testing.assert_allclose(x + step, [2.0])  # α·s(1) = 0.5·0.5 = 0.25 of the way from 1 to 3 + 2

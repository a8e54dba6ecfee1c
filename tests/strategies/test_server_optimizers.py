from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import TypeAdapter, ValidationError

from raysim.errors import AggregationError
from raysim.strategies.server_optimizers import (
    SERVER_OPTIMIZERS,
    AvgMConfig,
    FedAdagradConfig,
    FedAdamConfig,
    FedYogiConfig,
    SGDConfig,
)

NAMES = ["sgd", "avgm", "adagrad", "adam", "yogi"]
# Non-default settings, so a state that is saved or restored wrongly shows in the results.
TUNED = [
    SGDConfig(lr=0.7),
    AvgMConfig(lr=0.3, momentum=0.8),
    FedAdagradConfig(lr=0.05, beta1=0.5, tau=1e-2),
    FedAdamConfig(lr=0.02, beta1=0.8, beta2=0.9, tau=1e-2),
    FedYogiConfig(lr=0.02, beta1=0.8, beta2=0.9, tau=1e-2),
]


def build(config):
    return SERVER_OPTIMIZERS.build(config)


def default(name: str):
    return build(SERVER_OPTIMIZERS.entry(name).config())


def fedavg_step(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) + delta).astype(np.float32)


@pytest.mark.parametrize("config", [SGDConfig(lr=1.0), AvgMConfig(lr=1.0, momentum=0.0)], ids=["sgd", "avgm"])
def test_unit_rate_without_momentum_is_fedavg(config):
    rng = np.random.default_rng(1)
    optimizer = build(config)
    x = expected = rng.normal(size=40).astype(np.float32)
    for _ in range(6):
        delta = rng.normal(scale=0.3, size=40).astype(np.float32)
        x = optimizer.apply(x, delta)
        expected = fedavg_step(expected, delta)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, expected)


def test_fedavgm_accumulates_momentum_as_the_recurrence():
    optimizer = build(AvgMConfig(lr=0.1, momentum=0.5))
    deltas = [np.array([1.0, 2.0]), np.array([-1.0, 0.5]), np.array([0.25, -4.0])]
    # m1 = (1, 2); m2 = 0.5·m1 + Δ2 = (-0.5, 1.5); m3 = 0.5·m2 + Δ3 = (0, -3.25); x += 0.1·m each step.
    expected_x = [[1.1, -0.8], [1.05, -0.65], [1.05, -0.975]]
    x = np.array([1.0, -1.0], np.float32)
    for delta, want in zip(deltas, expected_x):
        x = optimizer.apply(x, delta)
        np.testing.assert_allclose(x, want, rtol=1e-6)
    np.testing.assert_allclose(optimizer.state_dict()["m"], [0.0, -3.25])
    assert int(optimizer.state_dict()["step"]) == 3


def wild_deltas(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    """Magnitudes from 1e-30 to 1e30 (inside float32), random signs, some exact zeros."""
    deltas = rng.choice([-1.0, 1.0], size=(steps, dim)) * 10.0 ** rng.uniform(-30, 30, size=(steps, dim))
    deltas[rng.random((steps, dim)) < 0.05] = 0.0
    return deltas.astype(np.float32)


@pytest.mark.parametrize("beta2", [0.0, 0.5, 0.99])
def test_yogi_second_moment_stays_positive_and_shrinks_at_most_by_beta2(beta2):
    rng = np.random.default_rng(2)
    optimizer = build(FedYogiConfig(beta2=beta2))
    x = np.zeros(16, np.float32)
    v_prev = np.full(16, 1e-3**2)
    for delta in wild_deltas(rng, 1000, 16):
        optimizer.apply(x, delta)
        v = optimizer.state_dict()["v"]
        assert (v > 0).all()
        # A decrease needs Δ² < v, and then v − (1 − β2)Δ² > β2·v.
        assert (v >= beta2 * v_prev * (1 - 1e-12)).all()
        v_prev = v


def test_yogi_moves_v_by_a_signed_share_of_delta_squared_and_can_drop_below_tau_squared():
    tau, beta2 = 0.1, 0.9
    optimizer = build(FedYogiConfig(tau=tau, beta2=beta2))
    x = np.zeros(2, np.float32)
    optimizer.apply(x, np.array([0.05, 1.0]))
    # v_{-1} = τ² = 0.01. Coordinate 0: Δ² = 0.0025 < v, so v falls by (1 − β2)·Δ²;
    # coordinate 1: Δ² = 1 > v, so it grows by (1 − β2)·1 = 0.1.
    np.testing.assert_allclose(optimizer.state_dict()["v"], [0.01 - 0.1 * 0.0025, 0.01 + 0.1])
    assert optimizer.state_dict()["v"][0] < tau**2


def test_adagrad_second_moment_is_the_running_sum_of_squares():
    rng = np.random.default_rng(3)
    tau = 1e-3
    optimizer = build(FedAdagradConfig(tau=tau))
    deltas = wild_deltas(rng, 300, 8).astype(np.float64)
    x = np.zeros(8, np.float32)
    v_prev = np.zeros(8)
    for t, delta in enumerate(deltas):
        optimizer.apply(x, delta)
        v = optimizer.state_dict()["v"]
        assert (v >= v_prev).all()
        v_prev = v
        if t % 50 == 0:
            np.testing.assert_allclose(v, tau**2 + (deltas[: t + 1] ** 2).sum(0), rtol=1e-12)


def test_adam_without_memory_moves_each_coordinate_by_a_normalised_step():
    rng = np.random.default_rng(4)
    lr, tau = 0.05, 1e-3
    optimizer = build(FedAdamConfig(lr=lr, beta1=0.0, beta2=0.0, tau=tau))
    x = rng.normal(size=30).astype(np.float32)
    for _ in range(5):
        delta = rng.normal(size=30) * 10.0 ** rng.uniform(-4, 2, size=30)
        new = optimizer.apply(x, delta)
        expected = x.astype(np.float64) + lr * delta / (np.abs(delta) + tau)
        np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-7)
        x = new


def test_adam_follows_algorithm_2_without_bias_correction():
    optimizer = build(FedAdamConfig(lr=0.1, beta1=0.5, beta2=0.75, tau=0.1))
    x = np.array([2.0], np.float32)
    # m_{-1} = 0, v_{-1} = τ² = 0.01.  Step 1, Δ = 1: m = 0.5, v = 0.75·0.01 + 0.25·1 = 0.2575.
    x = optimizer.apply(x, np.array([1.0]))
    x1 = 2.0 + 0.1 * 0.5 / (np.sqrt(0.2575) + 0.1)
    np.testing.assert_allclose(x, [x1], rtol=1e-6)
    # Step 2, Δ = −2: m = 0.5·0.5 − 0.5·2 = −0.75, v = 0.75·0.2575 + 0.25·4 = 1.193125.
    x = optimizer.apply(x, np.array([-2.0]))
    np.testing.assert_allclose(x, [x1 - 0.1 * 0.75 / (np.sqrt(1.193125) + 0.1)], rtol=1e-6)


@pytest.mark.parametrize("config", TUNED, ids=NAMES)
@pytest.mark.parametrize("steps_before", [0, 7])
def test_state_round_trips_through_npz(config, steps_before, tmp_path):
    rng = np.random.default_rng(5)
    deltas = rng.normal(size=(steps_before + 5, 12))
    original = build(config)
    x = rng.normal(size=12).astype(np.float32)
    for delta in deltas[:steps_before]:
        x = original.apply(x, delta)

    path = tmp_path / "optimizer.npz"
    np.savez(path, **original.state_dict())
    restored = build(config)
    with np.load(path) as saved:
        restored.load_state_dict(saved)

    x_restored = x.copy()
    for delta in deltas[steps_before:]:
        x = original.apply(x, delta)
        x_restored = restored.apply(x_restored, delta)
        np.testing.assert_array_equal(x_restored, x)
    for key, value in original.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[key], value)
    assert int(restored.state_dict()["step"]) == steps_before + 5


def test_loading_a_state_of_another_optimizer_is_refused():
    adam = default("adam")
    adam.apply(np.zeros(3, np.float32), np.ones(3))
    with pytest.raises(AggregationError, match="step, m"):
        default("avgm").load_state_dict(adam.state_dict())
    with pytest.raises(AggregationError):
        default("yogi").load_state_dict({"step": np.asarray(1), "m": np.zeros(3), "v": np.ones(4)})


QUADRATIC_RNG = np.random.default_rng(6)
A = QUADRATIC_RNG.normal(size=(20, 8))
B = QUADRATIC_RNG.normal(size=20)
SMOOTHNESS = np.linalg.eigvalsh(A.T @ A).max()  # L of f(x) = ½‖Ax − b‖²


def quadratic(x: np.ndarray) -> float:
    return 0.5 * float(np.sum((A @ x - B) ** 2))


@pytest.mark.parametrize(
    "config",
    [
        SGDConfig(lr=1 / SMOOTHNESS),
        AvgMConfig(lr=0.1 / SMOOTHNESS, momentum=0.9),
        FedAdagradConfig(),
        FedAdamConfig(),
        FedYogiConfig(),
    ],
    ids=NAMES,
)
def test_descends_a_convex_quadratic(config):
    optimal = quadratic(np.linalg.lstsq(A, B, rcond=None)[0])
    optimizer = build(config)
    x = np.zeros(8, np.float32)
    start_gap = quadratic(x) - optimal
    for _ in range(300):
        x = optimizer.apply(x, -(A.T @ (A @ x - B)))  # Δ_t = −∇f(x_t)
    assert quadratic(x) - optimal < 1e-3 * start_gap


@st.composite
def weights_and_deltas(draw):
    steps, dim = draw(st.integers(1, 6)), draw(st.integers(1, 20))
    finite = st.floats(-1e3, 1e3, width=32)
    return draw(arrays(np.float32, dim, elements=finite)), draw(arrays(np.float32, (steps, dim), elements=finite))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=50, deadline=None)
@given(case=weights_and_deltas())
def test_outputs_stay_finite(name, case):
    x, deltas = case
    optimizer = default(name)
    for delta in deltas:
        x = optimizer.apply(x, delta)
        assert x.dtype == np.float32 and x.shape == delta.shape
        assert np.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=50, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 30), elements=st.floats(-1e6, 1e6, width=32)))
def test_zero_update_from_zero_state_keeps_the_weights(name, x):
    optimizer = default(name)
    np.testing.assert_array_equal(optimizer.apply(x, np.zeros_like(x)), x)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_without_touching_the_state(name):
    optimizer = default(name)
    optimizer.apply(np.zeros(4, np.float32), np.ones(4))
    before = optimizer.state_dict()
    with pytest.raises(AggregationError):
        optimizer.apply(np.zeros(4, np.float32), np.ones(5))
    with pytest.raises(AggregationError):
        optimizer.apply(np.zeros((2, 2), np.float32), np.ones((2, 2)))
    with pytest.raises(AggregationError):
        optimizer.apply(np.zeros(4, np.float32), np.array([0.0, np.nan, 0.0, np.inf]))
    if name != "sgd":  # sgd keeps no per-weight state, so a new model size is fine for it
        with pytest.raises(AggregationError):
            optimizer.apply(np.zeros(6, np.float32), np.ones(6))
    after = optimizer.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_registry_builds_every_optimizer_from_its_yaml_name():
    assert SERVER_OPTIMIZERS.names() == sorted(NAMES)
    union = TypeAdapter(SERVER_OPTIMIZERS.config_union())
    for name in NAMES:
        config = union.validate_python({"name": name})
        assert config.name == name
        optimizer = SERVER_OPTIMIZERS.build(config)
        assert optimizer.apply(np.zeros(3, np.float32), np.ones(3)).shape == (3,)
    assert union.validate_python({"name": "yogi", "beta2": 0.9}) == FedYogiConfig(beta2=0.9)
    with pytest.raises(ValidationError):
        union.validate_python({"name": "sgd", "momentum": 0.9})
    with pytest.raises(KeyError, match="adam"):
        SERVER_OPTIMIZERS.entry("adamw")


@pytest.mark.parametrize(
    ("config", "values"),
    [
        (SGDConfig, {"lr": 0.0}),
        (SGDConfig, {"lr": -1.0}),
        (SGDConfig, {"lr": float("inf")}),
        (AvgMConfig, {"lr": 0.0}),
        (AvgMConfig, {"momentum": 1.0}),
        (AvgMConfig, {"momentum": -0.1}),
        (FedAdagradConfig, {"lr": -0.1}),
        (FedAdagradConfig, {"tau": 0.0}),
        (FedAdagradConfig, {"beta1": 1.0}),
        (FedAdamConfig, {"beta1": 1.0}),
        (FedAdamConfig, {"beta2": 1.0}),
        (FedAdamConfig, {"tau": -1e-3}),
        (FedYogiConfig, {"beta2": 1.5}),
        (FedYogiConfig, {"tau": 0.0}),
        (FedYogiConfig, {"lr": float("nan")}),
    ],
)
def test_config_rejects_bad_values(config, values):
    with pytest.raises(ValidationError):
        config(**values)


def test_configs_are_frozen():
    config = FedAdamConfig()
    with pytest.raises(ValidationError):
        config.lr = 1.0

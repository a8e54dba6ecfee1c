"""FedProx, SCAFFOLD and FedNova on the server side, checked against the local step rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.strategies import STRATEGIES, FedAvgConfig, ServerContext, UpdateBatch
from raysim.strategies.drift import FedNovaConfig, ScaffoldConfig, fednova_normalizer
from raysim.training import LocalTraining, local_step


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10), st.integers(1, 8), st.integers(1, 12), st.integers(0, 10_000))
def test_fednova_with_equal_local_steps_is_fedavg(count, dim, steps, seed):
    rng = np.random.default_rng(seed)
    batch = UpdateBatch(rng.normal(size=(count, dim)).astype(np.float32), rng.integers(1, 100, count),
                        steps=np.full(count, steps), lr=np.full(count, 0.1))
    fednova = STRATEGIES.build(FedNovaConfig(), ServerContext())
    fedavg = STRATEGIES.build(FedAvgConfig())
    np.testing.assert_allclose(fednova.pseudo_gradient(np.zeros(dim), batch), fedavg.pseudo_gradient(np.zeros(dim), batch),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum, prox_mu", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.0), (0.0, 2.0), (0.0, 0.3)])
@pytest.mark.parametrize("steps", [1, 4, 17])
def test_fednova_normalizer_is_the_step_rules_total_weight_on_the_gradients(momentum, prox_mu, steps):
    """On a loss with constant gradient 1, local SGD moves w by −η·a: a is what FedNova divides by."""
    lr = 0.05
    cfg = LocalTraining(epochs=1, batch_size=None, lr=lr, momentum=momentum, prox_mu=prox_mu)
    w, start, buffer = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for _ in range(steps):
        local_step([w], [torch.ones(1, dtype=torch.float64)], torch.tensor(lr, dtype=torch.float64), cfg,
                   start=[start], momentum=[buffer])
    expected = fednova_normalizer(np.array([steps]), np.array([lr]), momentum, prox_mu)[0]
    assert -w.item() / lr == pytest.approx(expected, rel=1e-12)


def test_fednova_removes_the_bias_of_unequal_local_steps():
    """Heterogeneous quadratics f_i(w) = ½‖A_i w − b_i‖², sensors taking 1 to 30 local steps, full
    participation. FedAvg drifts toward the sensors that take more steps; FedNova, which averages
    Δ_i / τ_i and rescales by τ_eff, lands much nearer w* = argmin Σ f_i (Wang et al. 2020, §3)."""
    num_sensors, rows, dim, rounds = 8, 6, 4, 600
    rng = np.random.default_rng(1)
    a = rng.standard_normal((num_sensors, rows, dim))
    b = rng.standard_normal((num_sensors, rows)) + rng.uniform(-3, 3, (num_sensors, 1))
    w_star = np.linalg.lstsq(a.reshape(-1, dim), b.reshape(-1), rcond=None)[0]
    steps = np.linspace(1, 30, num_sensors).round().astype(int)
    lr = 0.02 / np.linalg.eigvalsh(np.einsum("srd,sre->sde", a, a)).max()
    cfg = LocalTraining(epochs=1, batch_size=None, lr=lr)
    batch_of = dict(num_samples=np.full(num_sensors, rows), steps=steps, lr=np.full(num_sensors, lr))

    def run(strategy):
        x = np.zeros(dim)
        for _ in range(rounds):
            deltas = np.empty((num_sensors, dim))
            for i in range(num_sensors):
                w = torch.from_numpy(x.copy())
                for _ in range(steps[i]):
                    grad = torch.from_numpy(a[i].T @ (a[i] @ w.numpy() - b[i]))
                    local_step([w], [grad], torch.tensor(lr, dtype=torch.float64), cfg)
                deltas[i] = w.numpy() - x
            x = x + strategy.pseudo_gradient(x, UpdateBatch(deltas, **batch_of))
        return x

    fedavg = run(STRATEGIES.build(FedAvgConfig()))
    fednova = run(STRATEGIES.build(FedNovaConfig(), ServerContext()))
    assert np.linalg.norm(fednova - w_star) < 0.2 * np.linalg.norm(fedavg - w_star)


def test_scaffold_moves_its_control_by_the_sampled_share_of_the_mean_change():
    scaffold = STRATEGIES.build(ScaffoldConfig(server_lr=0.5), ServerContext(fleet_size=10, dim=3))
    deltas = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    controls = np.array([[2.0, 2.0, 0.0], [0.0, 4.0, 6.0]], np.float32)
    step = scaffold.pseudo_gradient(np.zeros(3), UpdateBatch(deltas, np.array([1, 100]), controls=controls))
    np.testing.assert_allclose(step, [0.25, 0.5, 0.0])  # uniform mean, times η_g
    np.testing.assert_allclose(scaffold.control, 2 / 10 * np.array([1.0, 3.0, 3.0]), rtol=1e-6)
    assert STRATEGIES.build(ScaffoldConfig(), ServerContext(dim=3)).client() == {"prox_mu": 0.0, "scaffold": 1}

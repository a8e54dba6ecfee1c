"""Invariants of the alignment losses: KD, MMD and MOON, batched over sensors.

Expectations come from independent formulas (plain numpy, one row or one
sensor at a time, or torch.nn.functional.kl_div), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.nn import functional as F

from raysim.alignment import kd_loss, mmd, moon_loss

modest = settings(max_examples=40, deadline=None)
f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = f64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T² · mean over rows of KL(p ‖ q), one row at a time."""
    kls = []
    for s_row, t_row in zip(student, teacher):
        p = _np_softmax(t_row / temperature)
        q = _np_softmax(s_row / temperature)
        kls.append(sum(p_k * (math.log(p_k) - math.log(q_k)) for p_k, q_k in zip(p, q)))
    return temperature**2 * float(np.mean(kls))


def _np_mmd(a: np.ndarray, b: np.ndarray, bandwidths=(0.5, 1.0, 2.0, 4.0, 8.0)) -> float:
    """Biased MMD² with the pooled mean-distinct-pair scale, by explicit loops."""
    pooled = np.concatenate([a, b])
    pairs = [((x - y) ** 2).sum() for i, x in enumerate(pooled) for j, y in enumerate(pooled) if i != j]
    scale = float(np.mean(pairs)) if pairs and np.mean(pairs) > 0 else 1.0

    def k(x, y):
        d = ((x - y) ** 2).sum()
        return sum(math.exp(-d / (2 * s**2 * scale)) for s in bandwidths)

    def mean_k(xs, ys):
        return float(np.mean([k(x, y) for x in xs for y in ys]))

    return max(mean_k(a, a) + mean_k(b, b) - 2 * mean_k(a, b), 0.0)


def _np_moon_row(z: np.ndarray, g: np.ndarray, p: np.ndarray, tau: float) -> float:
    def cos(x, y):
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    e_g, e_p = math.exp(cos(z, g) / tau), math.exp(cos(z, p) / tau)
    return -math.log(e_g / (e_g + e_p))


# --------------------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 20.0])
def test_kd_is_zero_when_logits_match(temperature):
    logits = _randn(4, 6, 10, seed=1) * 5
    loss = kd_loss(logits.clone(), logits, temperature)
    assert loss.shape == (4,)
    torch.testing.assert_close(loss, torch.zeros(4, dtype=f64), atol=1e-12, rtol=0)
    single = kd_loss(logits[0].float(), logits[0].float(), temperature)
    assert single.shape == () and single.dtype == torch.float32 and abs(single.item()) < 1e-6


@pytest.mark.parametrize("temperature", [0.7, 2.0, 5.0])
def test_kd_matches_independent_formula(temperature):
    student, teacher = _randn(3, 5, 7, seed=2) * 3, _randn(3, 5, 7, seed=3) * 3
    loss = kd_loss(student, teacher, temperature)
    expected = [_np_kd(student[i].numpy(), teacher[i].numpy(), temperature) for i in range(3)]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
    # one row against torch's own KL
    one = kd_loss(student[0, :1], teacher[0, :1], temperature)
    kl = F.kl_div(F.log_softmax(student[0, :1] / temperature, -1), F.softmax(teacher[0, :1] / temperature, -1), reduction="sum")
    torch.testing.assert_close(one, temperature**2 * kl)


@modest
@given(
    logits=arrays(np.float64, (2, 3, 5), elements=st.floats(-30, 30)),
    temperature=st.floats(0.1, 50),
)
def test_kd_is_nonnegative(logits, temperature):
    loss = kd_loss(torch.from_numpy(logits[0]), torch.from_numpy(logits[1]), temperature)
    assert torch.isfinite(loss) and loss.item() >= 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 16.0])
def test_kd_gradient_is_temperature_times_q_minus_p(temperature):
    student = (_randn(2, 6, 5, seed=4) * 2).requires_grad_()
    teacher = _randn(2, 6, 5, seed=5) * 2
    mask = torch.tensor([[True] * 6, [True, False, True, True, False, True]])
    kd_loss(student, teacher, temperature, mask).sum().backward()
    q = torch.softmax(student.detach() / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    n_rows = mask.sum(-1, keepdim=True).unsqueeze(-1).to(f64)
    expected = temperature * (q - p) / n_rows * mask.unsqueeze(-1)
    torch.testing.assert_close(student.grad, expected, rtol=1e-9, atol=1e-12)


def test_kd_teacher_gets_no_gradient():
    student, teacher = _randn(4, 3, seed=6).requires_grad_(), _randn(4, 3, seed=7).requires_grad_()
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_kd_is_nearly_temperature_independent_for_small_differences_at_high_temperature():
    teacher = _randn(3, 8, 10, seed=8)
    delta = 0.2 * _randn(3, 8, 10, seed=9)
    at_20, at_40 = kd_loss(teacher + delta, teacher, 20.0), kd_loss(teacher + delta, teacher, 40.0)
    torch.testing.assert_close(at_20, at_40, rtol=0.03, atol=0)
    # as T → ∞, p → uniform and T²·KL → ½ · mean_b var_k(δ_b) (second-order expansion of KL)
    limit = 0.5 * delta.var(dim=-1, unbiased=False).mean(dim=-1)
    torch.testing.assert_close(at_40, limit, rtol=0.03, atol=0)


def test_hotter_teacher_gives_softer_targets():
    """The target p implied by the gradient (p = q − n·∂L/∂s / T) gains entropy as T rises."""
    teacher = _randn(4, 10, seed=10) * 4
    entropies = []
    for temperature in [0.5, 1.0, 2.0, 4.0, 8.0]:
        student = torch.zeros_like(teacher, requires_grad=True)
        kd_loss(student, teacher, temperature).backward()
        q = torch.full_like(teacher, 1 / teacher.shape[-1])
        p = q - teacher.shape[0] * student.grad / temperature
        torch.testing.assert_close(p, torch.softmax(teacher / temperature, -1))
        entropies.append(float(-(p * p.log()).sum(-1).mean()))
    assert all(lo < hi for lo, hi in zip(entropies, entropies[1:]))


def test_kd_mask_ignores_padded_rows_and_empty_mask_gives_zero():
    student, teacher = _randn(3, 6, 4, seed=11), _randn(3, 6, 4, seed=12)
    student[:, 4:] = 1e6  # garbage in padded rows must not matter
    mask = torch.tensor([[True] * 4 + [False] * 2, [True, True] + [False] * 4, [False] * 6])
    loss = kd_loss(student, teacher, 2.0, mask)
    torch.testing.assert_close(loss[0], kd_loss(student[0, :4], teacher[0, :4], 2.0))
    torch.testing.assert_close(loss[1], kd_loss(student[1, :2], teacher[1, :2], 2.0))
    assert loss[2].item() == 0.0
    leaf = student.clone().requires_grad_()
    kd_loss(leaf, teacher, 2.0, mask).sum().backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[2].abs().sum() == 0


def test_kd_batched_equals_per_sensor_loop():
    student, teacher = _randn(5, 7, 6, seed=13), _randn(5, 7, 6, seed=14)
    mask = torch.rand(5, 7, generator=_gen(15)) > 0.3
    batched = kd_loss(student, teacher, 3.0, mask)
    looped = torch.stack([kd_loss(student[i, mask[i]], teacher[i, mask[i]], 3.0) for i in range(5)])
    torch.testing.assert_close(batched, looped)


# -------------------------------------------------------------------------- MMD


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_mmd_is_zero_for_identical_sets(dtype):
    feats = _randn(4, 12, 5, seed=20, dtype=dtype) * 10
    batched = mmd(feats, feats.clone())
    assert batched.shape == (4,) and batched.dtype == dtype
    assert (batched.abs() <= 1e-6).all()
    assert abs(mmd(feats[0], feats[0].clone()).item()) <= 1e-6


def test_mmd_matches_independent_formula():
    a, b = _randn(2, 6, 3, seed=21), _randn(2, 8, 3, seed=22) + 0.7
    expected = [_np_mmd(a[i].numpy(), b[i].numpy()) for i in range(2)]
    np.testing.assert_allclose(mmd(a, b).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(mmd(a[0], b[0], bandwidths=(1.0,)).item(), _np_mmd(a[0].numpy(), b[0].numpy(), (1.0,)), rtol=1e-9)


def test_mmd_positive_for_shift_and_grows_with_shift():
    a, b = _randn(3, 40, 4, seed=23), _randn(3, 40, 4, seed=24)
    values = torch.stack([mmd(a, b + shift) for shift in [0.5, 1.0, 2.0, 4.0]])
    assert (values > 0).all()
    assert (values[1:] > values[:-1]).all()


def test_mmd_is_symmetric_when_unmasked():
    a, b = _randn(3, 9, 4, seed=25), _randn(3, 13, 4, seed=26) * 2
    torch.testing.assert_close(mmd(a, b), mmd(b, a))


@modest
@given(shift=arrays(np.float64, (4,), elements=st.floats(-1e3, 1e3)))
def test_mmd_is_invariant_to_a_common_translation(shift):
    a, b = _randn(2, 7, 4, seed=27), _randn(2, 9, 4, seed=28) + 1
    offset = torch.from_numpy(shift)
    torch.testing.assert_close(mmd(a + offset, b + offset), mmd(a, b), rtol=1e-6, atol=1e-8)


def test_mmd_mask_equals_dropping_rows():
    a, b = _randn(3, 10, 4, seed=29), _randn(3, 8, 4, seed=30) + 0.5
    a[:, 6:] = 1e3  # padded rows far away would dominate if they counted
    mask = torch.tensor([[True] * 6 + [False] * 4, [True] * 3 + [False] * 7, [True] * 10])
    mask[2, 6:] = False
    masked = mmd(a, b, mask_a=mask)
    looped = torch.stack([mmd(a[i, mask[i]], b[i]) for i in range(3)])
    torch.testing.assert_close(masked, looped)
    empty = mmd(a, b, mask_a=torch.zeros(3, 10, dtype=torch.bool))
    torch.testing.assert_close(empty, torch.zeros(3, dtype=f64))


def test_mmd_shared_reference_broadcasts_over_sensors():
    a, b = _randn(4, 6, 3, seed=31), _randn(9, 3, seed=32)
    torch.testing.assert_close(mmd(a, b), torch.stack([mmd(a[i], b) for i in range(4)]))


def test_mmd_gradient_flows_to_a_and_reduces_the_discrepancy():
    a = (_randn(2, 15, 3, seed=33) + 2).requires_grad_()
    b = _randn(2, 15, 3, seed=34)
    before = mmd(a, b)
    before.sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad.abs().sum((-1, -2)) > 0).all()
    with torch.no_grad():
        after = mmd(a - 0.5 * a.grad / a.grad.norm(dim=(-1, -2), keepdim=True), b)
    assert (after < before.detach()).all()


def test_mmd_gradient_treats_the_scale_as_a_constant():
    """∂MMD²/∂a equals the gradient of the kernel formula with s held at its value."""
    a = _randn(7, 3, seed=36).requires_grad_()
    b = _randn(9, 3, seed=37) * 1.5 + 0.3
    mmd(a, b).backward()
    pooled = np.concatenate([a.detach().numpy(), b.numpy()])
    scale = float(np.mean([((x - y) ** 2).sum() for i, x in enumerate(pooled) for j, y in enumerate(pooled) if i != j]))
    a_ref = a.detach().clone().requires_grad_()

    def mean_k(x, y):
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return sum(torch.exp(-d / (2 * s**2 * scale)) for s in (0.5, 1.0, 2.0, 4.0, 8.0)).mean()

    (mean_k(a_ref, a_ref) + mean_k(b, b) - 2 * mean_k(a_ref, b)).backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-8, atol=1e-12)


def test_mmd_rejects_bad_bandwidths():
    a = _randn(3, 2, seed=35)
    for bad in [(), (1.0, 0.0), (-1.0,)]:
        with pytest.raises(ValueError):
            mmd(a, a, bandwidths=bad)


# ------------------------------------------------------------------------- MOON


def test_moon_is_log2_with_zero_gradient_when_previous_equals_global():
    z = _randn(3, 5, 8, seed=40).requires_grad_()
    reference = _randn(3, 5, 8, seed=41)
    loss = moon_loss(z, reference, reference.clone(), temperature=0.3)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2), dtype=f64))
    loss.sum().backward()
    assert z.grad.abs().max().item() == 0.0


def test_moon_matches_independent_formula():
    z, g, p = _randn(2, 4, 6, seed=42), _randn(2, 4, 6, seed=43), _randn(2, 4, 6, seed=44)
    loss = moon_loss(z, g, p, temperature=0.5)
    expected = [np.mean([_np_moon_row(z[i, b].numpy(), g[i, b].numpy(), p[i, b].numpy(), 0.5) for b in range(4)]) for i in range(2)]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)


def test_moon_prefers_alignment_with_global():
    g, p = _randn(6, 8, seed=45), _randn(6, 8, seed=46)
    toward_global = moon_loss(g + 0.1 * p, g, p)
    toward_previous = moon_loss(p + 0.1 * g, g, p)
    assert toward_global.item() < math.log(2) < toward_previous.item()
    z = (0.5 * (g + p)).requires_grad_()
    moon_loss(z, g, p).backward()
    step = z.detach() - 0.1 * z.grad
    assert moon_loss(step, g, p).item() < moon_loss(z.detach(), g, p).item()


def test_moon_batched_equals_loop_and_mask_drops_rows():
    z, g, p = _randn(4, 6, 5, seed=47), _randn(4, 6, 5, seed=48), _randn(4, 6, 5, seed=49)
    mask = torch.rand(4, 6, generator=_gen(50)) > 0.4
    mask[3] = False
    batched = moon_loss(z, g, p, temperature=0.7, mask=mask)
    looped = torch.stack([moon_loss(z[i, mask[i]], g[i, mask[i]], p[i, mask[i]], temperature=0.7) for i in range(3)])
    torch.testing.assert_close(batched[:3], looped)
    assert batched[3].item() == 0.0
    torch.testing.assert_close(moon_loss(z, g, p), torch.stack([moon_loss(z[i], g[i], p[i]) for i in range(4)]))


def test_moon_zero_vectors_give_finite_values():
    z = torch.zeros(3, 4, dtype=f64, requires_grad=True)
    g = torch.zeros(3, 4, dtype=f64)
    loss = moon_loss(z, g, _randn(3, 4, seed=51))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_nonpositive_temperature_is_rejected(temperature):
    x = _randn(2, 3, seed=60)
    with pytest.raises(ValueError):
        kd_loss(x, x, temperature)
    with pytest.raises(ValueError):
        moon_loss(x, x, x, temperature=temperature)

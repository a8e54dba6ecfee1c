"""Alignment losses added to a sensor's local objective, batched over a cohort.

Every function takes any number of leading batch dims ``...`` (one per sensor
of the cohort, or none) and returns one loss per leading index, in the dtype
of its inputs. They are pure torch (no Ray, no state), differentiable in the
student/local argument; the reference side (teacher, global, previous model)
is detached. A leading index with no real row (all of its mask False) gives 0.

- :func:`kd_loss` — knowledge distillation: sensors whose models have
  different architectures cannot average weights, so they share knowledge
  through soft labels (temperature-softened logits) on a public proxy set.
- :func:`mmd` — maximum mean discrepancy: aligns the distribution of a
  sensor's features on the proxy set with the global model's features there.
- :func:`moon_loss` — MOON's model-contrastive term: pulls a sensor's local
  representation toward the global model's and away from the representation
  of the sensor's own previous local model, against client drift.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

_COSINE_EPS = 1e-8  # ε: keeps cos(0, ·) finite (0) instead of NaN


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _masked_row_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    """(1/|R|)·Σ_{b∈R} x_b over the real rows R (mask True); 0 when R is empty."""
    if mask is None:
        return per_row.mean(dim=-1)
    # where, not multiply: a padded row holding inf/NaN must not leak into the sum
    total = torch.where(mask, per_row, torch.zeros_like(per_row)).sum(dim=-1)
    count = mask.sum(dim=-1).to(per_row.dtype)
    return total / count.clamp_min(1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """Soft-label distillation (Hinton, Vinyals & Dean, 2015).

        L = T² · (1/|R|) · Σ_{b∈R} Σ_k p_bk · (log p_bk − log q_bk),
        p_b = softmax(teacher_b / T),  q_b = softmax(student_b / T)

    student, teacher: logits (..., B, K); mask: (..., B) bool, True = real row
    (None: all rows). Returns (...). The teacher is a constant, so
    ∂L/∂student_b = T·(q_b − p_b)/|R|: the T² factor keeps gradient
    magnitudes comparable across temperatures.
    """
    _check_temperature(temperature)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach() / temperature, dim=-1)
    # KL ≥ 0 mathematically; the clamp only removes rounding below zero
    per_row = (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0)
    return temperature**2 * _masked_row_mean(per_row, mask)


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """‖x_i − y_j‖² for x (..., n, f), y (..., m, f) → (..., n, m), clamped at 0 against rounding."""
    cross = x @ y.transpose(-1, -2)
    sq = x.pow(2).sum(-1).unsqueeze(-1) + y.pow(2).sum(-1).unsqueeze(-2) - 2 * cross
    return sq.clamp_min(0)


def mmd(
    a: Tensor,
    b: Tensor,
    bandwidths: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    mask_a: Tensor | None = None,
) -> Tensor:
    """Squared maximum mean discrepancy, biased V-statistic (Gretton et al., JMLR 2012).

        MMD² = mean_{i,i'} k(a_i, a_i') + mean_{j,j'} k(b_j, b_j') − 2·mean_{i,j} k(a_i, b_j)
        k(x, y) = Σ_σ exp(−‖x − y‖² / (2σ²·s))

    a (..., n, f) with real rows mask_a (..., n) bool (None: all), b (..., m, f)
    (leading dims broadcast). s is the mean of ‖x − x'‖² over distinct pairs
    of real rows of the pooled set a∪b, per leading index and detached, so the
    bandwidths are relative to the features' scale; s = 0 is replaced by 1.
    The result is clamped at 0 (a V-statistic is ≥ 0; only rounding is cut).
    """
    if len(bandwidths) == 0 or any(not sigma > 0 for sigma in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive floats, got {bandwidths}")
    n, m = a.shape[-2], b.shape[-2]
    weight_a = a.new_ones(a.shape[:-1]) if mask_a is None else mask_a.to(a.dtype)
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2], weight_a.shape[:-1])
    a = a.expand(*lead, n, a.shape[-1])
    b = b.expand(*lead, m, b.shape[-1]).to(a.dtype)
    weight_a = weight_a.expand(*lead, n)
    weight = torch.cat([weight_a, a.new_ones((*lead, m))], dim=-1)  # (..., n+m)

    pooled = torch.cat([a, b], dim=-2)
    dist = _squared_distances(pooled, pooled)  # one matrix: on a = b the a-a, a-b and b-b blocks agree
    with torch.no_grad():
        pair_weight = weight.unsqueeze(-1) * weight.unsqueeze(-2)
        pair_weight = pair_weight * (1 - torch.eye(n + m, dtype=a.dtype, device=a.device))
        scale = (dist * pair_weight).sum((-1, -2)) / pair_weight.sum((-1, -2)).clamp_min(1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.unsqueeze(-1).unsqueeze(-1)
    kernel = sum(torch.exp(-dist / (2 * sigma**2 * scale)) for sigma in bandwidths)

    coef_a = weight_a / weight_a.sum(-1, keepdim=True).clamp_min(1)
    coef_b = a.new_full((*lead, m), 1.0 / max(m, 1))
    k_aa, k_ab, k_bb = kernel[..., :n, :n], kernel[..., :n, n:], kernel[..., n:, n:]

    def quad(left: Tensor, block: Tensor, right: Tensor) -> Tensor:
        return (left.unsqueeze(-1) * block * right.unsqueeze(-2)).sum((-1, -2))

    value = quad(coef_a, k_aa, coef_a) + quad(coef_b, k_bb, coef_b) - 2 * quad(coef_a, k_ab, coef_b)
    has_rows = (weight_a.sum(-1) > 0) & (m > 0)
    return torch.where(has_rows, value.clamp_min(0), torch.zeros_like(value))


def moon_loss(
    z: Tensor,
    z_global: Tensor,
    z_previous: Tensor,
    temperature: float = 0.5,
    mask: Tensor | None = None,
) -> Tensor:
    """Model-contrastive loss of MOON (Li, He & Song, CVPR 2021, eq. 3).

        ℓ_b = −log( e^{cos(z_b, g_b)/τ} / (e^{cos(z_b, g_b)/τ} + e^{cos(z_b, p_b)/τ}) )
            = softplus( (cos(z_b, p_b) − cos(z_b, g_b)) / τ )

    z, z_global (g), z_previous (p): representations (..., B, f) of the local,
    global and the sensor's previous local model; g and p are constants.
    cos(x, y) = x·y / (max(‖x‖, ε)·max(‖y‖, ε)), so a zero vector has cos 0.
    Mean over real rows (mask (..., B) bool, None: all). Returns (...).
    When p = g every ℓ_b = log 2 and ∂ℓ/∂z = 0.
    """
    _check_temperature(temperature)
    unit = F.normalize(z, dim=-1, eps=_COSINE_EPS)
    unit_global = F.normalize(z_global.detach(), dim=-1, eps=_COSINE_EPS)
    unit_previous = F.normalize(z_previous.detach(), dim=-1, eps=_COSINE_EPS)
    # cos(z, p) − cos(z, g) as one product, so p = g gives a gradient of exactly 0
    per_row = F.softplus((unit * (unit_previous - unit_global)).sum(dim=-1) / temperature)
    return _masked_row_mean(per_row, mask)

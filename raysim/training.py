"""Local SGD for a cohort of sensors that share a model and hyperparameters.

Every sensor starts from the same global weights w₀ and runs plain minibatch
SGD with L2 weight decay (no momentum) over its own batch plan:

    w ← w − lr · (∇L_b(w) + weight_decay · w),   L_b = mean cross-entropy over batch b

and reports its update Δ = w_final − w₀. Two implementations compute it:

- :func:`train_reference`, a per-sensor loop over an ordinary module with
  autograd: the oracle;
- :func:`train_vectorized`, the whole cohort as one batched computation per
  step (stacked flat parameters, ``torch.func.vmap`` of ``grad_and_value``).

They agree within float tolerance; ``tests/test_training.py`` proves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from raysim.models import ParamLayout

Dataset = tuple[Any, Any]  # (x float32 (n, C, T), y int (n,)), numpy arrays or tensors
Plan = Sequence[np.ndarray]  # one index array per SGD step


@dataclass(frozen=True)
class LocalTraining:
    """Hyperparameters of local SGD, shared by every sensor of a cohort."""

    epochs: int  # E: passes over the sensor's data
    batch_size: int | None  # B: samples per step; None = one full batch of all the sensor's samples
    lr: float  # η
    weight_decay: float = 0.0  # λ: w ← w − η(∇L + λw)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or None, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")

    @classmethod
    def from_scenario(cls, training: Any) -> LocalTraining:
        """From the scenario's ``training:`` section (``batch_size: full`` becomes None)."""
        batch_size = None if training.batch_size == "full" else int(training.batch_size)
        return cls(
            epochs=int(training.local_epochs),
            batch_size=batch_size,
            lr=float(training.lr),
            weight_decay=float(training.weight_decay),
        )

    def plan(self, num_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
        """:func:`batch_plan` with this configuration's epochs and batch size."""
        return batch_plan(num_samples, self.epochs, self.batch_size, rng)


def batch_plan(num_samples: int, epochs: int, batch_size: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """The sample indices of every SGD step: a fresh permutation per epoch, cut into
    batches of ``batch_size`` (the last one of an epoch smaller, never dropped).

    ``batch_size=None`` is full batch: one step per epoch. A sensor without
    samples has no steps.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be non-negative, got {num_samples}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 or None, got {batch_size}")
    if num_samples == 0:
        return []
    step = num_samples if batch_size is None else batch_size
    plan = []
    for _ in range(epochs):
        order = rng.permutation(num_samples)
        plan.extend(order[start : start + step] for start in range(0, num_samples, step))
    return plan


@dataclass
class TrainResult:
    """What local training returns for a cohort of S sensors, in the cohort's order."""

    updates: np.ndarray  # float32 (S, d): local weights − global weights
    train_loss: np.ndarray  # float64 (S,): mean of the batch loss before each step; NaN for a sensor without steps
    steps: np.ndarray  # int64 (S,): SGD steps taken


def _tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    """``torch.as_tensor``, copying read-only numpy arrays (Ray hands those out)
    instead of wrapping them, which torch warns about."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return torch.tensor(array, dtype=dtype)
    return torch.as_tensor(array, dtype=dtype)


def _check_cohort(
    layout: ParamLayout, global_flat: np.ndarray, datasets: Sequence[Dataset], plans: Sequence[Plan]
) -> np.ndarray:
    global_flat = np.array(global_flat, dtype=np.float32)  # a private, writable copy
    if global_flat.shape == (layout.size,):
        global_flat = np.broadcast_to(global_flat, (len(datasets), layout.size))
    if global_flat.shape != (len(datasets), layout.size):
        raise ValueError(
            f"start weights must have shape ({layout.size},) or ({len(datasets)}, {layout.size}), got {global_flat.shape}"
        )
    if len(datasets) != len(plans):
        raise ValueError(f"got {len(datasets)} datasets but {len(plans)} batch plans")
    for i, ((x, y), plan) in enumerate(zip(datasets, plans)):
        if len(x) != len(y):
            raise ValueError(f"sensor {i}: {len(x)} samples but {len(y)} labels")
        if not plan:
            continue
        if any(len(idx) == 0 for idx in plan):
            raise ValueError(f"sensor {i}: a batch plan step is empty")
        flat_plan = np.concatenate(plan)
        if flat_plan.min() < 0 or flat_plan.max() >= len(x):
            raise ValueError(f"sensor {i}: the batch plan indexes outside its {len(x)} samples")
    return global_flat


def _mean_loss(loss_sum: np.ndarray, steps: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, loss_sum / np.maximum(steps, 1), np.nan)


def train_reference(
    model: nn.Module,
    layout: ParamLayout,
    global_flat: np.ndarray,  # (d,) shared start weights, or (S, d): one start per sensor
    datasets: Sequence[Dataset],
    plans: Sequence[Plan],
    cfg: LocalTraining,
) -> TrainResult:
    """Train each sensor in turn on ``model`` with ordinary autograd (the oracle).

    ``model`` is scratch space: its parameters are overwritten.
    """
    global_flat = _check_cohort(layout, global_flat, datasets, plans)
    params = [p for _, p in model.named_parameters()]
    num_sensors = len(datasets)
    updates = np.zeros((num_sensors, layout.size), dtype=np.float32)
    loss_sum = np.zeros(num_sensors, dtype=np.float64)
    steps = np.array([len(plan) for plan in plans], dtype=np.int64)
    for i, ((x, y), plan) in enumerate(zip(datasets, plans)):
        x_t = _tensor(x, torch.float32)
        y_t = _tensor(y, torch.int64)
        layout.load_into(model, global_flat[i])
        for idx in plan:
            idx_t = torch.as_tensor(idx, dtype=torch.int64)
            loss = F.cross_entropy(model(x_t[idx_t]), y_t[idx_t])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(cfg.lr * (g + cfg.weight_decay * p))
            loss_sum[i] += loss.item()
        updates[i] = layout.flatten(model) - global_flat[i]
    return TrainResult(updates, _mean_loss(loss_sum, steps), steps)


def train_vectorized(
    model: nn.Module,
    layout: ParamLayout,
    global_flat: np.ndarray,  # (d,) shared start weights, or (S, d): one start per sensor
    datasets: Sequence[Dataset],
    plans: Sequence[Plan],
    cfg: LocalTraining,
) -> TrainResult:
    """Train the whole cohort at once: one batched forward/backward per SGD step.

    The S sensors' weights are stacked into W (S, d). Sensors are sorted by step
    count, descending, so at step s the sensors still training are a prefix
    W[:a_s] and finished ones cost nothing. Each step's batches are padded to a
    common width with a mask; a sensor's loss is the mean over its real rows
    only, which is exactly the reference's batch loss. The cohort's samples
    are concatenated once into one (Σn, C, T) tensor (no padding to the
    largest sensor), so a step's gather is one ``index_select``.
    ``model`` only supplies the architecture (``functional_call``); it is not modified.
    """
    global_flat = _check_cohort(layout, global_flat, datasets, plans)
    num_sensors = len(datasets)
    steps = np.array([len(plan) for plan in plans], dtype=np.int64)
    updates = np.zeros((num_sensors, layout.size), dtype=np.float32)
    loss_sum = np.zeros(num_sensors, dtype=np.float64)
    if num_sensors == 0 or steps.max() == 0:
        return TrainResult(updates, _mean_loss(loss_sum, steps), steps)

    order = np.argsort(-steps, kind="stable")
    active = order[steps[order] > 0]  # the sorted cohort; sensors without steps keep Δ = 0
    # All active sensors' samples, concatenated once; sensor row r owns x_all[starts[r] : starts[r] + n_r].
    x_all = torch.cat([_tensor(datasets[i][0], torch.float32) for i in active])
    y_all = torch.cat([_tensor(datasets[i][1], torch.int64) for i in active])
    counts = np.array([len(datasets[i][1]) for i in active], dtype=np.int64)
    starts = np.cumsum(counts) - counts
    sample_shape = tuple(x_all.shape[1:])

    def batch_loss(
        params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, params, (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        return torch.where(mask, per_sample, 0.0).sum() / mask.sum()

    # Differentiate with respect to the named views, not the flat row: the
    # backward of slicing a flat row would materialise a zero (S, d) tensor
    # per parameter tensor.
    cohort_step = _batched_step(model) or vmap(grad_and_value(batch_loss))
    weights = torch.from_numpy(global_flat[active])  # fancy indexing copies: private to this call
    step_losses = torch.zeros(len(active), dtype=torch.float64)
    active_steps = steps[active]
    for s in range(int(active_steps[0])):
        width = int((active_steps > s).sum())  # sorted, so the sensors still training are a prefix
        batches = [plans[i][s] for i in active[:width]]
        batch_width = cfg.batch_size or max(len(b) for b in batches)
        index = np.repeat(starts[:width, None], batch_width, axis=1)  # padding points at a real sample, masked out
        mask = np.zeros((width, batch_width), dtype=bool)
        for row, b in enumerate(batches):
            index[row, : len(b)] += b
            mask[row, : len(b)] = True
        index_t = torch.from_numpy(index.reshape(-1))
        x_b = x_all.index_select(0, index_t).view(width, batch_width, *sample_shape)
        y_b = y_all.index_select(0, index_t).view(width, batch_width)
        params = layout.split(weights[:width])  # views into the stacked weights
        grads, losses = cohort_step(params, x_b, y_b, torch.from_numpy(mask))
        with torch.no_grad():
            # In place on the views (no (S, d) temporaries): w ← w − lr·(g + wd·w).
            for name, p in params.items():
                g = grads[name]
                if cfg.weight_decay:
                    g.add_(p, alpha=cfg.weight_decay)
                p.add_(g, alpha=-cfg.lr)
        step_losses[:width] += losses.to(torch.float64)

    updates[active] = weights.sub_(torch.from_numpy(global_flat[active])).numpy()
    loss_sum[active] = step_losses.numpy()
    return TrainResult(updates, _mean_loss(loss_sum, steps), steps)


def _batched_step(model: nn.Module) -> Callable | None:
    """Per-sensor gradients from one ordinary backward pass, for models with ``forward_batched``.

    The cohort's loss is Σ_s L_s(W_s); since L_s depends only on W_s, its
    gradient with respect to the stacked W is exactly the stack of per-sensor
    gradients. This has a fraction of ``vmap``'s per-step overhead, which
    matters when a call trains few sensors (asynchronous aggregation).
    """
    forward = getattr(model, "forward_batched", None)
    if forward is None:
        return None

    def cohort_step(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        logits = forward(leaves, x)  # (S, B, classes)
        per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        losses = torch.where(mask, per_sample, 0.0).sum(1) / mask.sum(1)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), losses.detach()

    return cohort_step


def evaluate(
    model: nn.Module,
    layout: ParamLayout,
    flat: np.ndarray,
    x: Any,
    y: Any,
    batch_size: int = 8192,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of weights ``flat`` on ``(x, y)``.

    Runs under ``torch.no_grad()`` in chunks of ``batch_size``; ``model`` only
    supplies the architecture and is not modified.
    """
    x_t = _tensor(x, torch.float32)
    y_t = _tensor(y, torch.int64)
    if len(x_t) == 0 or len(x_t) != len(y_t):
        raise ValueError(f"evaluation needs matching, non-empty samples and labels, got {len(x_t)} and {len(y_t)}")
    params = layout.split(torch.tensor(np.asarray(flat), dtype=torch.float32))
    correct = 0
    loss_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(x_t), batch_size):
            logits = functional_call(model, params, (x_t[start : start + batch_size],))
            labels = y_t[start : start + batch_size]
            correct += int((logits.argmax(dim=-1) == labels).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(x_t), loss_sum / len(x_t)

"""Local SGD for a cohort of sensors that share a model and hyperparameters.

Every sensor starts from its start weights w₀ (the global model it was sent)
and runs minibatch SGD over its own batch plan. One step on batch b is
(:func:`local_step`):

    g ← ∇L_b(w) + λ·w + μ·(w − w₀) + c_corr
    m ← ρ·m + g                           (m = 0 before the first step; skipped when ρ = 0)
    w ← w − η_s · m                       (or η_s · g when ρ = 0)

with L_b the mean cross-entropy over batch b, λ the weight decay, μ the
FedProx proximal weight (Li et al., MLSys 2020), c_corr = c − c_i the
SCAFFOLD drift correction (Karimireddy et al., ICML 2020), ρ the momentum
(PyTorch-SGD style, no dampening) and η_s the sensor's own learning rate.
μ = 0, c_corr = 0, ρ = 0 is plain SGD with weight decay. Each sensor reports
its update Δ = w_final − w₀; :func:`scaffold_control_update` turns it into
the sensor's next SCAFFOLD control variate. Two implementations compute Δ:

- :func:`train_reference`, a per-sensor loop over an ordinary module with
  autograd: the oracle;
- :func:`train_vectorized`, the whole cohort as one batched computation per
  step (stacked flat parameters, ``torch.func.vmap`` of ``grad_and_value``).

They agree within float tolerance; ``tests/test_training.py`` proves it.
"""

from __future__ import annotations

import copy
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
    lr: float  # η: the default of every sensor's η_s
    weight_decay: float = 0.0  # λ: w ← w − η(∇L + λw)
    momentum: float = 0.0  # ρ: m ← ρm + g, w ← w − η m; 0 = plain SGD
    prox_mu: float = 0.0  # μ: FedProx term μ/2·‖w − w₀‖² added to the loss; 0 = none
    patience: int = 0  # early stopping: epochs without improvement before a sensor stops; 0 = never stops
    min_delta: float = 0.0  # early stopping: the least epoch-loss decrease that counts as improvement

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or None, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.prox_mu >= 0:
            raise ValueError(f"prox_mu must be non-negative, got {self.prox_mu}")

    @classmethod
    def from_scenario(cls, training: Any) -> LocalTraining:
        """From the scenario's ``training:`` section (``batch_size: full`` becomes None).

        ``prox_mu`` belongs to the aggregation strategy: the caller sets it
        with ``dataclasses.replace``.
        """
        batch_size = None if training.batch_size == "full" else int(training.batch_size)
        stopping = getattr(training, "early_stopping", None)
        return cls(
            patience=int(stopping.patience) if stopping is not None else 0,
            min_delta=float(stopping.min_delta) if stopping is not None else 0.0,
            epochs=int(training.local_epochs),
            batch_size=batch_size,
            lr=float(training.lr),
            weight_decay=float(training.weight_decay),
            momentum=float(getattr(training, "momentum", 0.0)),
            prox_mu=float(getattr(training, "prox_mu", 0.0)),
        )

    def plan(self, num_samples: int, rng: np.random.Generator, epochs: int | None = None) -> list[np.ndarray]:
        """:func:`batch_plan` with this configuration's batch size and epochs (or ``epochs``)."""
        return batch_plan(num_samples, self.epochs if epochs is None else epochs, self.batch_size, rng)

    def steps_per_epoch(self, num_samples: np.ndarray) -> np.ndarray:
        """SGD steps of one local epoch for each sample count (0 for a sensor without samples)."""
        n = np.asarray(num_samples, dtype=np.int64)
        if self.batch_size is None:
            return (n > 0).astype(np.int64)
        return -(-n // self.batch_size)


class _EarlyStop:
    """Per-sensor early stopping state over a cohort: each sensor's epoch loss against its best so far."""

    def __init__(self, cfg: LocalTraining, steps_per_epoch: np.ndarray) -> None:
        self.cfg = cfg
        self.per_epoch = np.maximum(steps_per_epoch, 1)
        self.alive = np.ones(len(steps_per_epoch), dtype=bool)
        self.best = np.full(len(steps_per_epoch), np.inf)
        self.bad = np.zeros(len(steps_per_epoch), dtype=np.int64)
        self.epoch_sum = np.zeros(len(steps_per_epoch))

    def after_step(self, step: int, rows: np.ndarray, losses: np.ndarray) -> None:
        """Rows ``rows`` (still alive) took step ``step`` with these batch losses; stop those whose epoch ended
        without improving for ``patience`` epochs."""
        self.epoch_sum[rows] += losses
        ended = rows[(step + 1) % self.per_epoch[rows] == 0]
        mean = self.epoch_sum[ended] / self.per_epoch[ended]
        better = mean < self.best[ended] - self.cfg.min_delta
        self.best[ended] = np.where(better, mean, self.best[ended])
        self.bad[ended] = np.where(better, 0, self.bad[ended] + 1)
        self.alive[ended[self.bad[ended] >= self.cfg.patience]] = False
        self.epoch_sum[ended] = 0.0


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


@dataclass
class Regularizers:
    """Terms added to every sensor's local loss besides the cross-entropy on its own batch.

    With S sensors in the cohort, each local step s of sensor i also reads the
    proxy samples ``proxy_plans[i][s]`` (one index array per step, like the
    batch plan) and adds

        α · T²·KL(softmax(teacher/T) ‖ softmax(student/T))   on the proxy batch (``teacher`` given)
      + λ · MMD²(features(w; proxy batch), features(w₀; proxy batch))
      + μ · MOON(features(w; x_b), features(w₀; x_b), features(w_prev; x_b))

    with w₀ the sensor's start weights and w_prev its previous local model
    (``previous`` (S, d); its start weights for a sensor without one, which
    makes the MOON term constant). See :mod:`raysim.alignment`.
    """

    proxy_x: Any = None  # float32 (P, C, T): the public proxy set
    proxy_plans: Sequence[Plan] = ()  # per sensor: one proxy index array per local step
    teacher: Any = None  # float32 (P, K): consensus logits; None = no distillation term
    kd_weight: float = 0.0
    temperature: float = 1.0
    mmd_weight: float = 0.0
    moon_weight: float = 0.0
    moon_temperature: float = 0.5
    previous: np.ndarray | None = None  # float32 (S, d): each sensor's previous local weights (MOON)

    @property
    def active(self) -> bool:
        return (self.teacher is not None and self.kd_weight > 0) or self.mmd_weight > 0 or self.moon_weight > 0

    @property
    def uses_proxy(self) -> bool:
        return (self.teacher is not None and self.kd_weight > 0) or self.mmd_weight > 0

    def extra_loss(self, features: Callable, classify: Callable, params: Any, start: Any, previous: Any,
                   x: torch.Tensor, mask: torch.Tensor | None, proxy_x: torch.Tensor | None,
                   teacher: torch.Tensor | None, own_features: torch.Tensor) -> torch.Tensor:
        """The added terms for one step, batched or for one sensor (``...`` leading dims throughout).

        ``features(p, x)`` and ``classify(p, h)`` evaluate the model with
        parameters ``p`` (``params`` trained, ``start`` = w₀, ``previous`` = w_prev);
        ``own_features`` are the trained model's features of the private batch x.
        """
        from raysim import alignment

        total = torch.zeros(own_features.shape[:-2], dtype=own_features.dtype)
        if self.uses_proxy:
            proxy_features = features(params, proxy_x)
            if teacher is not None and self.kd_weight > 0:
                student = classify(params, proxy_features)
                total = total + self.kd_weight * alignment.kd_loss(student, teacher, self.temperature)
            if self.mmd_weight > 0:
                with torch.no_grad():
                    reference = features(start, proxy_x)
                total = total + self.mmd_weight * alignment.mmd(proxy_features, reference)
        if self.moon_weight > 0:
            with torch.no_grad():
                z_global, z_previous = features(start, x), features(previous, x)
            total = total + self.moon_weight * alignment.moon_loss(own_features, z_global, z_previous,
                                                                   self.moon_temperature, mask)
        return total


def local_step(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: torch.Tensor,
    cfg: LocalTraining,
    *,
    start: Sequence[torch.Tensor] | None = None,
    correction: Sequence[torch.Tensor] | None = None,
    momentum: Sequence[torch.Tensor] | None = None,
) -> None:
    """One local SGD step, in place: the rule of the module docstring.

        g ← ∇L_b(w) + λ·w + μ·(w − w₀) + c_corr,   m ← ρ·m + g,   w ← w − η_s · m

    Each sequence holds one tensor per parameter tensor, aligned: ``weights``
    (updated), ``grads`` (∇L_b; overwritten, used as scratch), ``start`` (w₀;
    needed when μ > 0), ``correction`` (c_corr = c − c_i of SCAFFOLD option II,
    Karimireddy et al., ICML 2020; None = 0) and ``momentum`` (m, updated;
    needed when ρ > 0). They may stack S sensors along dim 0, with ``lr`` of
    shape (S,) giving each its η_s, or hold one sensor with a 0-dim ``lr``.
    """
    if cfg.prox_mu and start is None:
        raise ValueError("a proximal term (prox_mu > 0) needs the start weights")
    if cfg.momentum and momentum is None:
        raise ValueError("momentum > 0 needs momentum buffers")
    for k, (w, g) in enumerate(zip(weights, grads)):
        if cfg.weight_decay:
            g.add_(w * cfg.weight_decay)  # λ·w rounded on its own, so plain SGD keeps its exact results
        if cfg.prox_mu:
            g.add_(w, alpha=cfg.prox_mu).sub_(start[k], alpha=cfg.prox_mu)  # μ·(w − w₀) without a temporary
        if correction is not None:
            g.add_(correction[k])
        rate = lr.reshape(lr.shape + (1,) * (g.dim() - lr.dim()))
        if cfg.momentum:
            torch.mul(momentum[k].mul_(cfg.momentum).add_(g), rate, out=g)
        else:
            g.mul_(rate)
        w.sub_(g)


def scaffold_control_update(
    c_local: np.ndarray, c_global: np.ndarray, update: np.ndarray, steps: np.ndarray, lr: np.ndarray
) -> np.ndarray:
    """Sensors' next control variates, SCAFFOLD option II (Karimireddy et al., ICML 2020, Alg. 1):

        c_i⁺ = c_i − c + (x − y_i)/(K_i·η_i) = c_i − c − Δ_i/(K_i·η_i)

    ``c_local`` (S, d) holds the c_i, ``c_global`` (d,) the server's c,
    ``update`` (S, d) each Δ_i = y_i − x after ``steps`` (S,) K_i local steps
    of rate ``lr`` (S,) η_i. A sensor that took no step keeps its c_i. The
    result has the dtype of the inputs (float32 for float32 ones).
    """
    c_local, c_global, update = np.asarray(c_local), np.asarray(c_global), np.asarray(update)
    num_sensors = len(c_local)
    steps = np.asarray(steps)
    lr = np.asarray(lr, dtype=np.float64)
    if c_local.ndim != 2 or update.shape != c_local.shape or c_global.shape != c_local.shape[1:]:
        raise ValueError(
            f"expected c_local and update of one shape (S, d) and c_global (d,), "
            f"got {c_local.shape}, {update.shape} and {c_global.shape}"
        )
    if steps.shape != (num_sensors,) or lr.shape != (num_sensors,):
        raise ValueError(f"expected steps and lr of shape ({num_sensors},), got {steps.shape} and {lr.shape}")
    if (steps < 0).any() or not (lr > 0).all():
        raise ValueError("steps must be non-negative and lr positive")
    dtype = np.result_type(c_local, c_global, update)
    trained = steps > 0
    new = c_local.astype(dtype, copy=True)
    inv_step = (1.0 / (steps[trained] * lr[trained])).astype(dtype)
    new[trained] = c_local[trained] - c_global - update[trained] * inv_step[:, None]
    return new


def _tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    """``torch.as_tensor``, copying read-only numpy arrays (Ray hands those out)
    instead of wrapping them, which torch warns about."""
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return torch.tensor(array, dtype=dtype)
    return torch.as_tensor(array, dtype=dtype)


def _check_cohort(
    layout: ParamLayout,
    global_flat: np.ndarray,
    datasets: Sequence[Dataset],
    plans: Sequence[Plan],
    cfg: LocalTraining,
    lr: np.ndarray | None,
    correction: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The start weights as a private (S, d) float32 array, each sensor's η_s
    (S,) and the SCAFFOLD correction (S, d) float32 or None, checked."""
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
    num_sensors = len(datasets)
    lr = np.full(num_sensors, cfg.lr) if lr is None else np.asarray(lr, dtype=np.float64)
    if lr.shape != (num_sensors,) or not (np.isfinite(lr) & (lr > 0)).all():
        raise ValueError(f"lr must hold one positive, finite rate per sensor, shape ({num_sensors},); got {lr.shape}")
    if correction is not None:
        correction = np.asarray(correction, dtype=np.float32)
        if correction.shape != (num_sensors, layout.size):
            raise ValueError(f"correction must have shape ({num_sensors}, {layout.size}), got {correction.shape}")
    return global_flat, lr, correction


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
    *,
    lr: np.ndarray | None = None,  # (S,) each sensor's η_s; None = cfg.lr for all
    correction: np.ndarray | None = None,  # (S, d) SCAFFOLD c − c_i added to every step's gradient; None = 0
    regularizers: Regularizers | None = None,  # distillation, MMD and MOON terms; None = cross-entropy only
) -> TrainResult:
    """Train each sensor in turn on ``model`` with ordinary autograd (the oracle).

    ``model`` is scratch space: its parameters are overwritten. The reported
    train loss is the cross-entropy on the sensor's own batches, whatever
    regularizers are added.
    """
    global_flat, lr, correction = _check_cohort(layout, global_flat, datasets, plans, cfg, lr, correction)
    params = [p for _, p in model.named_parameters()]
    num_sensors = len(datasets)
    updates = np.zeros((num_sensors, layout.size), dtype=np.float32)
    loss_sum = np.zeros(num_sensors, dtype=np.float64)
    steps = np.array([len(plan) for plan in plans], dtype=np.int64)
    reg = regularizers if regularizers is not None and regularizers.active else None
    if reg is not None:  # scratch copies holding w₀ and w_prev, for the features the terms compare against
        anchor, before = copy.deepcopy(model), copy.deepcopy(model)
        proxy_x = _tensor(reg.proxy_x, torch.float32) if reg.uses_proxy else None
        teacher = _tensor(reg.teacher, torch.float32) if reg.teacher is not None else None
    for i, ((x, y), plan) in enumerate(zip(datasets, plans)):
        x_t = _tensor(x, torch.float32)
        y_t = _tensor(y, torch.int64)
        layout.load_into(model, global_flat[i])
        rate = torch.tensor(lr[i], dtype=torch.float32)
        start = [p.detach().clone() for p in params] if cfg.prox_mu else None
        momentum = [torch.zeros_like(p) for p in params] if cfg.momentum else None
        drift = None if correction is None else list(layout.split(_tensor(correction[i], torch.float32)).values())
        if reg is not None:
            layout.load_into(anchor, global_flat[i])
            layout.load_into(before, reg.previous[i] if reg.previous is not None else global_flat[i])
        stop = _EarlyStop(cfg, cfg.steps_per_epoch([len(y)])) if cfg.patience else None
        for step, idx in enumerate(plan):
            if stop is not None and not stop.alive[0]:
                steps[i] = step  # stopped early: the steps taken
                break
            idx_t = torch.as_tensor(idx, dtype=torch.int64)
            if reg is None:
                loss = objective = F.cross_entropy(model(x_t[idx_t]), y_t[idx_t])
            else:
                own = model.features(x_t[idx_t])
                loss = F.cross_entropy(model.classify(own), y_t[idx_t])
                picked = torch.as_tensor(reg.proxy_plans[i][step], dtype=torch.int64) if reg.uses_proxy else None
                objective = loss + reg.extra_loss(
                    lambda m, h: m.features(h), lambda m, h: m.classify(h), model, anchor, before, x_t[idx_t], None,
                    proxy_x[picked] if picked is not None else None,
                    teacher[picked] if teacher is not None else None, own)
            grads = torch.autograd.grad(objective, params)
            with torch.no_grad():
                local_step(params, grads, rate, cfg, start=start, correction=drift, momentum=momentum)
            loss_sum[i] += loss.item()
            if stop is not None:
                stop.after_step(step, np.array([0]), np.array([loss.item()]))
        updates[i] = layout.flatten(model) - global_flat[i]
    return TrainResult(updates, _mean_loss(loss_sum, steps), steps)


def train_vectorized(
    model: nn.Module,
    layout: ParamLayout,
    global_flat: np.ndarray,  # (d,) shared start weights, or (S, d): one start per sensor
    datasets: Sequence[Dataset],
    plans: Sequence[Plan],
    cfg: LocalTraining,
    *,
    lr: np.ndarray | None = None,  # (S,) each sensor's η_s; None = cfg.lr for all
    correction: np.ndarray | None = None,  # (S, d) SCAFFOLD c − c_i added to every step's gradient; None = 0
    regularizers: Regularizers | None = None,  # distillation, MMD and MOON terms; None = cross-entropy only
) -> TrainResult:
    """Train the whole cohort at once: one batched forward/backward per SGD step.

    The S sensors' weights are stacked into W (S, d). Sensors are sorted by step
    count, descending, so at step s the sensors still training are a prefix
    W[:a_s] and finished ones cost nothing. Each step's batches are padded to a
    common width with a mask; a sensor's loss is the mean over its real rows
    only, which is exactly the reference's batch loss. The cohort's samples
    are concatenated once into one (Σn, C, T) tensor (no padding to the
    largest sensor), so a step's gather is one ``index_select``. The per-sensor
    state of :func:`local_step` (start weights w₀, η_s, c_corr, momentum m) is
    stacked in the same sorted order, so step s slices the same prefix of each.
    ``model`` only supplies the architecture (``functional_call``); it is not modified.

    With ``regularizers`` the model needs ``features_batched`` and
    ``classify_batched`` (both registry models have them); a model without
    them trains those cohorts with :func:`train_reference`, one sensor at a time.
    """
    reg = regularizers if regularizers is not None and regularizers.active else None
    if reg is not None and not hasattr(model, "features_batched"):
        return train_reference(model, layout, global_flat, datasets, plans, cfg, lr=lr, correction=correction,
                               regularizers=reg)
    global_flat, lr, correction = _check_cohort(layout, global_flat, datasets, plans, cfg, lr, correction)
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
    # Plain SGD (no weight decay, momentum, proximal, drift or regularizer term) on a model that can take the
    # step itself never stores a gradient: see MLP.sgd_step_batched.
    plain = not (cfg.weight_decay or cfg.momentum or cfg.prox_mu) and correction is None and reg is None
    fused_step = getattr(model, "sgd_step_batched", None) if plain else None
    # Row r of every stacked state is sensor active[r]; fancy indexing copies, so all are private to this call.
    weights = torch.from_numpy(global_flat[active])
    start = weights.clone() if cfg.prox_mu else None  # the proximal anchor w₀, kept only when used
    rates = torch.from_numpy(lr[active].astype(np.float32))
    drift = None if correction is None else torch.from_numpy(correction[active])
    momentum = torch.zeros_like(weights) if cfg.momentum else None
    if reg is not None:
        cohort_step = _regularized_step(model, reg)
        anchor = torch.from_numpy(global_flat[active])  # w₀ of each row
        previous = anchor if reg.previous is None else torch.from_numpy(
            np.asarray(reg.previous, dtype=np.float32)[active])
        proxy_x = _tensor(reg.proxy_x, torch.float32) if reg.uses_proxy else None
        teacher = _tensor(reg.teacher, torch.float32) if reg.teacher is not None else None

    def prefix(stacked: torch.Tensor | None, width: int) -> list[torch.Tensor] | None:
        """Per-parameter views of the first ``width`` sensors' rows."""
        return None if stacked is None else list(layout.split(stacked[:width]).values())

    step_losses = torch.zeros(len(active), dtype=torch.float64)
    active_steps = steps[active]
    stop = _EarlyStop(cfg, cfg.steps_per_epoch(counts)) if cfg.patience else None
    taken = np.zeros(len(active), dtype=np.int64)
    for s in range(int(active_steps[0])):
        width = int((active_steps > s).sum())  # sorted, so the sensors still training are a prefix
        if stop is not None:  # a sensor that stopped early keeps its place in the prefix with a rate of 0
            going = stop.alive[:width]
            if not going.any():
                break
            taken[:width] += going
            step_rates = rates[:width] * torch.from_numpy(going.astype(np.float32))
        else:
            step_rates = rates[:width]
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
        if fused_step is not None:
            losses = fused_step(params, x_b, y_b, torch.from_numpy(mask), step_rates)
            _account(step_losses, losses, width, stop, s)
            continue
        if reg is None:
            grads, losses = cohort_step(params, x_b, y_b, torch.from_numpy(mask))
        else:
            picked = (torch.from_numpy(np.stack([reg.proxy_plans[i][s] for i in active[:width]]).astype(np.int64))
                      if reg.uses_proxy else None)
            grads, losses = cohort_step(
                params, x_b, y_b, torch.from_numpy(mask), layout.split(anchor[:width]), layout.split(previous[:width]),
                proxy_x[picked] if picked is not None else None,
                teacher[picked] if teacher is not None and picked is not None else None)
        with torch.no_grad():
            local_step(
                list(params.values()),
                [grads[name] for name in params],
                step_rates,
                cfg,
                start=prefix(start, width),
                correction=prefix(drift, width),
                momentum=prefix(momentum, width),
            )
        _account(step_losses, losses, width, stop, s)

    updates[active] = weights.sub_(torch.from_numpy(global_flat[active])).numpy()
    loss_sum[active] = step_losses.numpy()
    if stop is not None:
        steps[active] = taken
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


def _account(step_losses: torch.Tensor, losses: torch.Tensor, width: int, stop: "_EarlyStop | None", step: int) -> None:
    """Add a step's batch losses to the first ``width`` sensors' sums (only those still training, with early
    stopping, which then learns who stops)."""
    losses = losses.detach().to(torch.float64)
    if stop is None:
        step_losses[:width] += losses
        return
    rows = np.flatnonzero(stop.alive[:width])
    step_losses[rows] += losses[rows]
    stop.after_step(step, rows, losses[rows].numpy())


def _regularized_step(model: nn.Module, reg: Regularizers) -> Callable:
    """Like :func:`_batched_step`, with the :class:`Regularizers` terms added to every sensor's loss
    (the losses returned are still the cross-entropies on the sensors' own batches)."""
    features, classify = model.features_batched, model.classify_batched

    def cohort_step(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    start: dict[str, torch.Tensor], previous: dict[str, torch.Tensor], proxy_x: torch.Tensor | None,
                    teacher: torch.Tensor | None):
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        own = features(leaves, x)  # (S, B, width)
        logits = classify(leaves, own)
        per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        losses = torch.where(mask, per_sample, 0.0).sum(1) / mask.sum(1)
        objective = losses + reg.extra_loss(features, classify, leaves, start, previous, x, mask, proxy_x, teacher, own)
        grads = torch.autograd.grad(objective.sum(), list(leaves.values()))
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

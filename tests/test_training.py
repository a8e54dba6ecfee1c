"""Local SGD: the vectorized cohort path agrees with the per-sensor reference,
and both agree with plain autograd on a freshly built module."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raysim.models import DSCNNConfig, MLPConfig, ParamLayout, build_model, init_weights
from raysim.scenario import Training
from raysim.training import (
    LocalTraining,
    TrainResult,
    batch_plan,
    evaluate,
    local_step,
    scaffold_control_update,
    train_reference,
    train_vectorized,
)

CHANNELS, WINDOW, CLASSES = 3, 9, 4
MLP = MLPConfig(hidden=(12,))
DSCNN = DSCNNConfig(channels=(4, 6), kernel_size=3)


def make_cohort(sample_counts, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, CHANNELS, WINDOW)).astype(np.float32), rng.integers(0, CLASSES, n))
        for n in sample_counts
    ]


def make_plans(datasets, cfg, seed=0):
    return [cfg.plan(len(x), np.random.default_rng([seed, i])) for i, (x, _) in enumerate(datasets)]


def setup(config, seed=0):
    model = build_model(config, CHANNELS, WINDOW, CLASSES)
    return model, ParamLayout.of(model), init_weights(config, CHANNELS, WINDOW, CLASSES, seed)


# --------------------------------------------------------------------------- batch plans


@pytest.mark.parametrize("num_samples,epochs,batch_size", [(10, 1, 3), (17, 3, 4), (5, 2, 5), (4, 2, 16), (9, 2, None)])
def test_batch_plan_covers_every_index_once_per_epoch(num_samples, epochs, batch_size):
    plan = batch_plan(num_samples, epochs, batch_size, np.random.default_rng(0))
    per_epoch = 1 if batch_size is None else math.ceil(num_samples / batch_size)
    assert len(plan) == epochs * per_epoch
    step = num_samples if batch_size is None else batch_size
    for e in range(epochs):
        epoch = plan[e * per_epoch : (e + 1) * per_epoch]
        assert sorted(np.concatenate(epoch).tolist()) == list(range(num_samples))
        assert [len(b) for b in epoch[:-1]] == [step] * (per_epoch - 1)
        assert len(epoch[-1]) == num_samples - step * (per_epoch - 1)  # the remainder, not dropped


def test_batch_plan_reshuffles_each_epoch_and_follows_the_rng():
    a = batch_plan(50, 2, None, np.random.default_rng(1))
    assert not np.array_equal(a[0], a[1])
    b = batch_plan(50, 2, None, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_batch_plan_of_an_empty_sensor_is_empty():
    assert batch_plan(0, 3, 4, np.random.default_rng(0)) == []


@pytest.mark.parametrize("args", [(-1, 1, 4), (5, 0, 4), (5, 1, 0)])
def test_batch_plan_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        batch_plan(*args, np.random.default_rng(0))


def test_local_training_from_scenario():
    cfg = LocalTraining.from_scenario(Training(local_epochs=3, batch_size=8, lr=0.1, weight_decay=0.01))
    assert cfg == LocalTraining(epochs=3, batch_size=8, lr=0.1, weight_decay=0.01)
    assert cfg.momentum == 0.0 and cfg.prox_mu == 0.0
    assert LocalTraining.from_scenario(Training(batch_size="full")).batch_size is None
    section = SimpleNamespace(local_epochs=1, batch_size=4, lr=0.1, weight_decay=0.0, momentum=0.9, prox_mu=0.5)
    assert LocalTraining.from_scenario(section) == LocalTraining(1, 4, 0.1, momentum=0.9, prox_mu=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(weight_decay=-1.0),
        dict(momentum=-0.1),
        dict(momentum=1.0),
        dict(momentum=float("nan")),
        dict(prox_mu=-0.5),
        dict(prox_mu=float("nan")),
    ],
)
def test_local_training_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        LocalTraining(**{**dict(epochs=1, batch_size=4, lr=0.1), **kwargs})


# --------------------------------------------------------------------------- against autograd


def autograd_step(config, seed, x, y, lr, weight_decay):
    """−lr·(∇L + wd·w) and L on a freshly built module, by plain torch autograd."""
    module = build_model(config, CHANNELS, WINDOW, CLASSES, seed=seed)
    loss = F.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    step = [-(lr * (p.grad + weight_decay * p.detach())).reshape(-1) for p in module.parameters()]
    return torch.cat(step).numpy(), loss.item()


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
@pytest.mark.parametrize("config", [MLP, DSCNN], ids=["mlp", "dscnn"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_full_batch_step_is_minus_lr_times_the_gradient(train, config, weight_decay):
    model, layout, w0 = setup(config, seed=5)
    [(x, y)] = make_cohort([13])
    cfg = LocalTraining(epochs=1, batch_size=None, lr=0.3, weight_decay=weight_decay)
    result = train(model, layout, w0, [(x, y)], make_plans([(x, y)], cfg), cfg)

    expected_update, expected_loss = autograd_step(config, 5, x, y, 0.3, weight_decay)
    assert result.updates.dtype == np.float32 and result.updates.shape == (1, layout.size)
    assert np.abs(expected_update).max() > 1e-4
    np.testing.assert_allclose(result.updates[0], expected_update, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.train_loss, [expected_loss], rtol=1e-6)
    assert result.steps.tolist() == [1]


def test_two_sgd_steps_follow_the_batch_plan():
    """Two steps on given batches, replayed by hand with autograd."""
    model, layout, w0 = setup(MLP, seed=2)
    [(x, y)] = make_cohort([6])
    plan = [np.array([4, 0, 2]), np.array([1, 5])]
    cfg = LocalTraining(epochs=1, batch_size=3, lr=0.5, weight_decay=0.05)
    module = build_model(MLP, CHANNELS, WINDOW, CLASSES, seed=2)
    losses = []
    for idx in plan:
        loss = F.cross_entropy(module(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        module.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in module.parameters():
                p -= 0.5 * (p.grad + 0.05 * p)
        losses.append(loss.item())
    expected = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy() - w0
    for train in (train_reference, train_vectorized):
        result = train(model, layout, w0, [(x, y)], [plan], cfg)
        np.testing.assert_allclose(result.updates[0], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.train_loss, [np.mean(losses)], rtol=1e-6)


# --------------------------------------------------------------------------- vectorized == reference


DEEP_TANH = MLPConfig(hidden=(10, 7), activation="tanh")  # the fused SGD step's other activation, two hidden layers
LOGISTIC = MLPConfig(hidden=())  # and no hidden layer at all


@pytest.mark.parametrize("config", [MLP, DSCNN, DEEP_TANH, LOGISTIC], ids=["mlp", "dscnn", "mlp-tanh", "logistic"])
@pytest.mark.parametrize(
    "epochs,batch_size,weight_decay",
    [(1, 4, 0.0), (3, 5, 0.01), (2, None, 0.0), (2, None, 0.05), (1, 64, 0.0)],
)
def test_vectorized_matches_reference(config, epochs, batch_size, weight_decay):
    counts = [7, 1, 23, 4, 12, 5, 16, 2]
    datasets = make_cohort(counts, seed=3)
    model, layout, w0 = setup(config, seed=1)
    cfg = LocalTraining(epochs=epochs, batch_size=batch_size, lr=0.2, weight_decay=weight_decay)
    plans = make_plans(datasets, cfg, seed=4)

    ref = train_reference(model, layout, w0, datasets, plans, cfg)
    vec = train_vectorized(model, layout, w0, datasets, plans, cfg)

    per_epoch = [1 if batch_size is None else math.ceil(n / batch_size) for n in counts]
    assert ref.steps.tolist() == vec.steps.tolist() == [epochs * k for k in per_epoch]
    assert vec.updates.dtype == np.float32 and vec.updates.shape == (len(counts), layout.size)
    assert vec.train_loss.dtype == np.float64 and vec.steps.dtype == np.int64
    assert (np.abs(ref.updates).max(axis=1) > 1e-4).all()  # every sensor moved
    np.testing.assert_allclose(vec.updates, ref.updates, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vec.train_loss, ref.train_loss, rtol=1e-5, atol=1e-6)


def test_vectorized_does_not_modify_its_inputs():
    datasets = make_cohort([5, 9])
    model, layout, w0 = setup(MLP)
    before_model = layout.flatten(model)
    before_w0 = w0.copy()
    before_x = [x.copy() for x, _ in datasets]
    cfg = LocalTraining(epochs=1, batch_size=3, lr=0.1)
    train_vectorized(model, layout, w0, datasets, make_plans(datasets, cfg), cfg)
    np.testing.assert_array_equal(layout.flatten(model), before_model)
    np.testing.assert_array_equal(w0, before_w0)
    for (x, _), x0 in zip(datasets, before_x):
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_sensor_order_does_not_change_any_update(train):
    counts = [3, 11, 6, 1, 9]
    datasets = make_cohort(counts, seed=8)
    model, layout, w0 = setup(MLP)
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.1, weight_decay=0.01)
    plans = make_plans(datasets, cfg)
    result = train(model, layout, w0, datasets, plans, cfg)

    perm = [3, 0, 4, 2, 1]
    shuffled = train(model, layout, w0, [datasets[i] for i in perm], [plans[i] for i in perm], cfg)
    np.testing.assert_allclose(shuffled.updates, result.updates[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled.train_loss, result.train_loss[perm], rtol=1e-6)
    np.testing.assert_array_equal(shuffled.steps, result.steps[perm])

    alone = train(model, layout, w0, [datasets[2]], [plans[2]], cfg)
    np.testing.assert_allclose(alone.updates[0], result.updates[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_a_sensor_without_samples_sends_a_zero_update(train):
    datasets = make_cohort([6, 0, 3])
    model, layout, w0 = setup(MLP)
    cfg = LocalTraining(epochs=1, batch_size=4, lr=0.1)
    result = train(model, layout, w0, datasets, make_plans(datasets, cfg), cfg)
    assert isinstance(result, TrainResult)
    assert result.steps.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(result.updates[1], np.zeros(layout.size, dtype=np.float32))
    assert np.isnan(result.train_loss[1]) and np.isfinite(result.train_loss[[0, 2]]).all()
    assert np.abs(result.updates[[0, 2]]).max() > 0


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_bad_cohorts_and_per_sensor_arguments_are_refused(train):
    datasets = make_cohort([4, 4])
    model, layout, w0 = setup(MLP)
    cfg = LocalTraining(epochs=1, batch_size=2, lr=0.1)
    plans = make_plans(datasets, cfg)
    with pytest.raises(ValueError):
        train(model, layout, w0, datasets, plans[:1], cfg)
    with pytest.raises(ValueError):
        train(model, layout, w0, datasets, [plans[0], [np.array([0, 4])]], cfg)
    with pytest.raises(ValueError):
        train(model, layout, w0[:-1], datasets, plans, cfg)
    for lr in (np.array([0.1]), np.array([0.1, 0.0]), np.array([0.1, np.nan])):  # one positive rate per sensor
        with pytest.raises(ValueError):
            train(model, layout, w0, datasets, plans, cfg, lr=lr)
    with pytest.raises(ValueError):
        train(model, layout, w0, datasets, plans, cfg, correction=np.zeros((2, layout.size - 1), dtype=np.float32))


def test_training_lowers_the_loss_on_a_learnable_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, 200)
    prototypes = rng.standard_normal((CLASSES, CHANNELS, WINDOW))
    x = (prototypes[y] + 0.3 * rng.standard_normal((200, CHANNELS, WINDOW))).astype(np.float32)
    model, layout, w0 = setup(MLP)
    cfg = LocalTraining(epochs=5, batch_size=32, lr=0.1)
    result = train_vectorized(model, layout, w0, [(x, y)], make_plans([(x, y)], cfg), cfg)
    before = evaluate(model, layout, w0, x, y)
    after = evaluate(model, layout, w0 + result.updates[0], x, y)
    assert after[1] < before[1] / 2 and after[0] > 0.9


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("config", [MLP, DSCNN], ids=["mlp", "dscnn"])
@pytest.mark.parametrize("batch_size", [7, 8192])
def test_evaluate_matches_a_direct_forward_pass(config, batch_size):
    [(x, y)] = make_cohort([50], seed=11)
    module = build_model(config, CHANNELS, WINDOW, CLASSES, seed=6)
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    expected_acc = float((logits.argmax(-1).numpy() == y).mean())
    expected_loss = F.cross_entropy(logits, torch.from_numpy(y)).item()

    scratch = build_model(config, CHANNELS, WINDOW, CLASSES, seed=0)
    flat = init_weights(config, CHANNELS, WINDOW, CLASSES, seed=6)
    acc, loss = evaluate(scratch, ParamLayout.of(scratch), flat, x, y, batch_size=batch_size)
    assert acc == pytest.approx(expected_acc, abs=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_read_only_inputs_are_accepted_without_warnings(train):
    """Arrays from the Ray object store are read-only; they must work as they are."""
    datasets = make_cohort([5, 3])
    model, layout, w0 = setup(MLP)
    for x, y in datasets:
        x.flags.writeable = False
        y.flags.writeable = False
    w0.flags.writeable = False
    cfg = LocalTraining(epochs=1, batch_size=2, lr=0.1)
    result = train(model, layout, w0, datasets, make_plans(datasets, cfg), cfg)
    assert np.abs(result.updates).max() > 0
    evaluate(model, layout, w0, *datasets[0])
    layout.load_into(model, w0)


def test_a_sensors_vectorized_update_does_not_depend_on_its_cohort():
    """Bitwise: what else an actor trains in the same call never changes a sensor's update
    (this is what makes results independent of the number of client actors)."""
    config = MLPConfig(hidden=(16,))
    model = build_model(config, 6, 32, 6)
    layout = ParamLayout.of(model)
    start = init_weights(config, 6, 32, 6, seed=1)
    rng = np.random.default_rng(4)
    datasets = [(rng.normal(size=(n, 6, 32)).astype(np.float32), rng.integers(0, 6, n)) for n in rng.integers(3, 50, 12)]
    cfg = LocalTraining(epochs=2, batch_size=8, lr=0.1)
    plans = [batch_plan(len(y), 2, 8, np.random.default_rng(i)) for i, (_, y) in enumerate(datasets)]
    whole = train_vectorized(model, layout, start, datasets, plans, cfg)
    for subset in ([0], [3, 7], list(range(0, 12, 3)), list(range(6))):
        part = train_vectorized(model, layout, start, [datasets[i] for i in subset], [plans[i] for i in subset], cfg)
        np.testing.assert_array_equal(part.updates, whole.updates[subset])
        np.testing.assert_array_equal(part.train_loss, whole.train_loss[subset])


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_each_sensor_can_start_from_its_own_weights(train):
    """Async training batches sensors that started from different model versions."""
    config = MLPConfig(hidden=(8,))
    model = build_model(config, 2, 8, 3)
    layout = ParamLayout.of(model)
    starts = np.stack([init_weights(config, 2, 8, 3, seed=s) for s in (1, 2, 3)])
    rng = np.random.default_rng(9)
    datasets = [(rng.normal(size=(n, 2, 8)).astype(np.float32), rng.integers(0, 3, n)) for n in (5, 9, 7)]
    cfg = LocalTraining(epochs=1, batch_size=4, lr=0.1)
    plans = [batch_plan(len(y), 1, 4, np.random.default_rng(i)) for i, (_, y) in enumerate(datasets)]
    together = train(model, layout, starts, datasets, plans, cfg)
    for i in range(3):
        alone = train(model, layout, starts[i], [datasets[i]], [plans[i]], cfg)
        np.testing.assert_allclose(together.updates[i], alone.updates[0], atol=1e-6)
    assert not np.allclose(together.updates[0], train(model, layout, starts[1], [datasets[0]], [plans[0]], cfg).updates[0])


class _WithoutBatchedForward(nn.Module):
    """A model that only has an ordinary forward: training falls back to torch.func.vmap."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("drift", [False, True], ids=["plain", "drift"])
@pytest.mark.parametrize("config", [MLPConfig(hidden=(8,)), DSCNNConfig(channels=(4,), kernel_size=3)])
def test_vmap_fallback_matches_reference(config, drift):
    model = _WithoutBatchedForward(build_model(config, 3, 10, 4))
    assert not hasattr(model, "forward_batched")
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    rng = np.random.default_rng(2)
    datasets = [(rng.normal(size=(n, 3, 10)).astype(np.float32), rng.integers(0, 4, n)) for n in (3, 11, 6)]
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.1, weight_decay=0.01)
    kwargs = {}
    if drift:  # FedProx, momentum, per-sensor rates and a SCAFFOLD correction through the vmap path too
        cfg = dataclasses.replace(cfg, momentum=0.8, prox_mu=0.3)
        kwargs = dict(lr=np.array([0.05, 0.1, 0.2]), correction=0.1 * rng.standard_normal((3, layout.size)).astype(np.float32))
    plans = [batch_plan(len(y), 2, 4, np.random.default_rng(i)) for i, (_, y) in enumerate(datasets)]
    fast = train_vectorized(model, layout, start, datasets, plans, cfg, **kwargs)
    slow = train_reference(model, layout, start, datasets, plans, cfg, **kwargs)
    np.testing.assert_allclose(fast.updates, slow.updates, atol=1e-5)
    np.testing.assert_allclose(fast.train_loss, slow.train_loss, rtol=1e-5)


@pytest.mark.parametrize("config", [MLPConfig(hidden=(8, 5), activation="tanh"), DSCNNConfig(channels=(4, 6), kernel_size=4)])
def test_forward_batched_equals_each_models_own_forward(config):
    model = build_model(config, 3, 9, 4)
    layout = ParamLayout.of(model)
    stacked = torch.from_numpy(np.stack([init_weights(config, 3, 9, 4, seed=s) for s in range(3)]))
    x = torch.randn(3, 5, 3, 9, generator=torch.Generator().manual_seed(0))
    batched = model.forward_batched(layout.split(stacked), x)
    for s in range(3):
        layout.load_into(model, stacked[s].numpy())
        with torch.no_grad():
            np.testing.assert_allclose(batched[s].detach().numpy(), model(x[s]).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- FedProx, SCAFFOLD, momentum, per-sensor rates


DRIFT_TERMS = {
    "prox": dict(prox_mu=0.5),
    "momentum": dict(momentum=0.9),
    "lr": dict(lr=True),
    "correction": dict(correction=True),
    "all": dict(prox_mu=0.5, momentum=0.9, lr=True, correction=True),
}


def drift_arguments(terms, cfg, num_sensors, size, seed=0):
    """The LocalTraining and the lr / correction keywords of one DRIFT_TERMS entry."""
    rng = np.random.default_rng([seed, 99])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in terms.items() if k in ("prox_mu", "momentum")})
    kwargs = {}
    if terms.get("lr"):
        kwargs["lr"] = rng.uniform(0.05, 0.3, num_sensors)
    if terms.get("correction"):
        kwargs["correction"] = (0.05 * rng.standard_normal((num_sensors, size))).astype(np.float32)
    return cfg, kwargs


@pytest.mark.parametrize("config", [MLP, DSCNN], ids=["mlp", "dscnn"])
@pytest.mark.parametrize("terms", DRIFT_TERMS.values(), ids=DRIFT_TERMS.keys())
def test_vectorized_matches_reference_with_drift_terms(config, terms):
    """Unsorted step counts and one start per sensor: the vectorized path must pair each
    sensor's rate, correction, anchor w₀ and momentum buffer with its own weights."""
    counts = [7, 1, 23, 4, 12, 5, 16, 2]
    datasets = make_cohort(counts, seed=3)
    model, layout, w0 = setup(config, seed=1)
    starts = w0 + 0.05 * np.random.default_rng(5).standard_normal((len(counts), layout.size)).astype(np.float32)
    cfg, kwargs = drift_arguments(terms, LocalTraining(epochs=2, batch_size=5, lr=0.2, weight_decay=0.01), len(counts), layout.size)
    plans = make_plans(datasets, cfg, seed=4)

    ref = train_reference(model, layout, starts, datasets, plans, cfg, **kwargs)
    vec = train_vectorized(model, layout, starts, datasets, plans, cfg, **kwargs)
    plain = train_reference(model, layout, starts, datasets, plans, LocalTraining(epochs=2, batch_size=5, lr=0.2, weight_decay=0.01))

    assert vec.updates.dtype == np.float32 and vec.updates.shape == (len(counts), layout.size)
    assert np.abs(ref.updates - plain.updates).max(axis=1).min() > 1e-4  # the terms changed every sensor's update
    np.testing.assert_allclose(vec.updates, ref.updates, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vec.train_loss, ref.train_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(vec.steps, ref.steps)


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
@pytest.mark.parametrize("config", [MLP, DSCNN], ids=["mlp", "dscnn"])
def test_drift_terms_equal_torch_sgd_on_the_proximal_objective(train, config):
    """Oracle: torch.optim.SGD (momentum ρ, weight decay λ) on
    L_b(w) + μ/2·‖w − w₀‖² + ⟨c_corr, w⟩, whose gradient adds μ(w − w₀) + c_corr."""
    [(x, y)] = make_cohort([11], seed=2)
    model, layout, w0 = setup(config, seed=3)
    mu, rho, wd, lr = 0.7, 0.8, 0.02, 0.15
    correction = (0.1 * np.random.default_rng(1).standard_normal(layout.size)).astype(np.float32)
    plan = [np.array([3, 0, 9, 4]), np.array([1, 10, 2, 8]), np.array([5, 7, 6]), np.array([2, 0, 10, 1])]

    module = build_model(config, CHANNELS, WINDOW, CLASSES, seed=3)
    anchors = [p.detach().clone() for p in module.parameters()]
    corrections = [c.detach() for c in layout.split(torch.from_numpy(correction)).values()]
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=rho, weight_decay=wd)
    for idx in plan:
        objective = F.cross_entropy(module(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        for p, anchor, c in zip(module.parameters(), anchors, corrections):
            objective = objective + mu / 2 * (p - anchor).square().sum() + (c * p).sum()
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).numpy() - w0

    cfg = LocalTraining(epochs=1, batch_size=4, lr=0.9, weight_decay=wd, momentum=rho, prox_mu=mu)  # lr overridden below
    result = train(model, layout, w0, [(x, y)], [plan], cfg, lr=np.array([lr]), correction=correction[None])
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(result.updates[0], expected, rtol=1e-4, atol=1e-6)


def old_reference_update(model, layout, w0, x, y, plan, lr, weight_decay):
    """The reference step as it was before the drift terms existed, replayed by hand."""
    layout.load_into(model, w0)
    params = list(model.parameters())
    for idx in plan:
        loss = F.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * (g + weight_decay * p))
    return layout.flatten(model) - w0


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_without_drift_terms_the_reference_is_plain_sgd_bit_for_bit(weight_decay):
    datasets = make_cohort([9, 14], seed=6)
    model, layout, w0 = setup(MLP, seed=4)
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.2, weight_decay=weight_decay, momentum=0.0, prox_mu=0.0)
    plans = make_plans(datasets, cfg)
    explicit = dict(lr=np.full(2, 0.2), correction=np.zeros((2, layout.size), dtype=np.float32))
    for kwargs in ({}, explicit):
        result = train_reference(model, layout, w0, datasets, plans, cfg, **kwargs)
        for i, (x, y) in enumerate(datasets):
            expected = old_reference_update(build_model(MLP, CHANNELS, WINDOW, CLASSES), layout, w0, x, y, plans[i], 0.2, weight_decay)
            np.testing.assert_array_equal(result.updates[i], expected)


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
def test_a_large_proximal_term_keeps_updates_near_the_start(train):
    datasets = make_cohort([12, 20, 7], seed=1)
    model, layout, w0 = setup(MLP, seed=2)
    cfg = LocalTraining(epochs=4, batch_size=4, lr=0.1)
    plans = make_plans(datasets, cfg)
    free = train(model, layout, w0, datasets, plans, cfg)
    pulled = train(model, layout, w0, datasets, plans, dataclasses.replace(cfg, prox_mu=5.0))
    free_norm = np.linalg.norm(free.updates, axis=1)
    pulled_norm = np.linalg.norm(pulled.updates, axis=1)
    assert (pulled_norm > 0).all() and (pulled_norm < 0.75 * free_norm).all()
    zero_mu = train(model, layout, w0, datasets, plans, dataclasses.replace(cfg, prox_mu=0.0))
    np.testing.assert_array_equal(zero_mu.updates, free.updates)


@pytest.mark.parametrize("train", [train_reference, train_vectorized])
@pytest.mark.parametrize("terms", [{}, dict(momentum=0.9, prox_mu=0.2)], ids=["sgd", "momentum+prox"])
def test_a_sensors_own_lr_equals_training_it_alone_with_that_lr(train, terms):
    counts = [5, 13, 8, 3]
    datasets = make_cohort(counts, seed=4)
    model, layout, w0 = setup(MLP, seed=1)
    cfg = LocalTraining(epochs=2, batch_size=3, lr=0.1, weight_decay=0.01, **terms)
    plans = make_plans(datasets, cfg, seed=2)
    rates = np.array([0.03, 0.25, 0.1, 0.4])
    together = train(model, layout, w0, datasets, plans, cfg, lr=rates)
    for i, rate in enumerate(rates):
        alone = train(model, layout, w0, [datasets[i]], [plans[i]], dataclasses.replace(cfg, lr=float(rate)))
        np.testing.assert_allclose(together.updates[i], alone.updates[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(together.train_loss[i], alone.train_loss[0], rtol=1e-7)
    same = train(model, layout, w0, datasets, plans, cfg)
    assert not np.allclose(together.updates[1], same.updates[1], atol=1e-4)


def test_scaffold_control_update_follows_option_two():
    """c_i⁺ = c_i − c − Δ_i/(K_i·η_i), worked by hand; a sensor without steps keeps c_i."""
    c_local = np.array([[1.0, -2.0], [0.5, 0.5], [3.0, 1.0]], dtype=np.float32)
    c_global = np.array([0.5, 1.0], dtype=np.float32)
    update = np.array([[-2.0, 4.0], [1.0, -1.0], [7.0, 7.0]], dtype=np.float32)
    steps = np.array([4, 10, 0])
    lr = np.array([0.25, 0.05, 0.1])
    new = scaffold_control_update(c_local, c_global, update, steps, lr)
    assert new.dtype == np.float32
    expected = [[1.0 - 0.5 + 2.0, -2.0 - 1.0 - 4.0], [0.5 - 0.5 - 2.0, 0.5 - 1.0 + 2.0], [3.0, 1.0]]
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    np.testing.assert_array_equal(c_local[2], [3.0, 1.0])  # the input is not modified
    with pytest.raises(ValueError):
        scaffold_control_update(c_local, c_global, update[:2], steps, lr)
    with pytest.raises(ValueError):
        scaffold_control_update(c_local, c_global, update, steps, np.array([0.1, 0.0, 0.1]))


def test_scaffold_reaches_the_optimum_that_fedavg_misses_on_heterogeneous_quadratics():
    """Sensors i minimise f_i(w) = ½‖A_i w − b_i‖² by K local steps of :func:`local_step`
    from x, with exact gradients and full participation. FedAvg (x ← x + mean Δ_i) drifts
    to a fixed point away from w* = argmin Σ f_i; SCAFFOLD (Karimireddy et al. 2020,
    option II: c_corr = c − c_i, c ← c + mean(c_i⁺ − c_i)) converges to w*."""
    num_sensors, rows, dim, local_steps, rounds = 10, 8, 5, 10, 400
    rng = np.random.default_rng(0)
    a = rng.standard_normal((num_sensors, rows, dim)) * rng.uniform(0.3, 1.5, (num_sensors, 1, 1))
    b = rng.standard_normal((num_sensors, rows)) + rng.uniform(-3, 3, (num_sensors, 1))
    w_star = np.linalg.lstsq(a.reshape(-1, dim), b.reshape(-1), rcond=None)[0]  # Σ f_i = ½‖A w − b‖², A the stacked A_i
    lr = np.full(num_sensors, 0.3 / np.linalg.eigvalsh(np.einsum("srd,sre->sde", a, a)).max())
    a_t, b_t, lr_t = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(lr)
    cfg = LocalTraining(epochs=1, batch_size=None, lr=float(lr[0]))

    def run(scaffold):
        x = np.zeros(dim)
        c_global, c_local = np.zeros(dim), np.zeros((num_sensors, dim))
        for _ in range(rounds):
            w = torch.from_numpy(np.tile(x, (num_sensors, 1)))
            correction = [torch.from_numpy(c_global - c_local)] if scaffold else None
            for _ in range(local_steps):
                residual = torch.einsum("srd,sd->sr", a_t, w) - b_t
                grad = torch.einsum("srd,sr->sd", a_t, residual)  # A_iᵀ(A_i w − b_i)
                local_step([w], [grad], lr_t, cfg, correction=correction)
            delta = w.numpy() - x
            if scaffold:
                c_new = scaffold_control_update(c_local, c_global, delta, np.full(num_sensors, local_steps), lr)
                c_global = c_global + (c_new - c_local).mean(axis=0)
                c_local = c_new
            previous, x = x, x + delta.mean(axis=0)
        return x, np.linalg.norm(x - previous)

    fedavg, fedavg_last_move = run(scaffold=False)
    scaffold, _ = run(scaffold=True)
    scale = np.linalg.norm(w_star)
    assert fedavg_last_move < 1e-10 * scale  # FedAvg has converged ...
    assert np.linalg.norm(fedavg - w_star) > 1e-2 * scale  # ... to the wrong point
    assert np.linalg.norm(scaffold - w_star) < 1e-6 * scale

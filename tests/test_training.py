"""Local SGD: the vectorized cohort path agrees with the per-sensor reference,
and both agree with plain autograd on a freshly built module."""

import math

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
    assert LocalTraining.from_scenario(Training(batch_size="full")).batch_size is None


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(weight_decay=-1.0)])
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


@pytest.mark.parametrize("config", [MLP, DSCNN], ids=["mlp", "dscnn"])
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
def test_bad_cohorts_are_refused(train):
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


@pytest.mark.parametrize("config", [MLPConfig(hidden=(8,)), DSCNNConfig(channels=(4,), kernel_size=3)])
def test_vmap_fallback_matches_reference(config):
    model = _WithoutBatchedForward(build_model(config, 3, 10, 4))
    assert not hasattr(model, "forward_batched")
    layout = ParamLayout.of(model)
    start = layout.flatten(model)
    rng = np.random.default_rng(2)
    datasets = [(rng.normal(size=(n, 3, 10)).astype(np.float32), rng.integers(0, 4, n)) for n in (3, 11, 6)]
    cfg = LocalTraining(epochs=2, batch_size=4, lr=0.1, weight_decay=0.01)
    plans = [batch_plan(len(y), 2, 4, np.random.default_rng(i)) for i, (_, y) in enumerate(datasets)]
    fast = train_vectorized(model, layout, start, datasets, plans, cfg)
    slow = train_reference(model, layout, start, datasets, plans, cfg)
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

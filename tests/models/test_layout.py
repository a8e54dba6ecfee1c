"""ParamLayout: the flat float32 vector is exactly the module's parameters, in a stable order."""

import numpy as np
import pytest
import torch
from torch import nn

from raysim.models import DSCNNConfig, MLPConfig, ParamLayout, build_model, init_weights

CONFIGS = [MLPConfig(hidden=(16, 8)), MLPConfig(hidden=()), DSCNNConfig(channels=(4, 8), kernel_size=3)]
SHAPE = dict(channels=3, window=11, classes=5)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_flatten_load_flatten_round_trip(config):
    source = build_model(config, **SHAPE, seed=1)
    target = build_model(config, **SHAPE, seed=2)
    layout = ParamLayout.of(source)
    flat = layout.flatten(source)
    assert flat.dtype == np.float32 and flat.shape == (layout.size,)
    assert not np.array_equal(flat, layout.flatten(target))

    layout.load_into(target, flat)
    np.testing.assert_array_equal(layout.flatten(target), flat)
    x = torch.randn(4, SHAPE["channels"], SHAPE["window"])
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_layout_follows_named_parameters(config):
    module = build_model(config, **SHAPE)
    layout = ParamLayout.of(module)
    named = list(module.named_parameters())
    assert list(layout.names) == [name for name, _ in named]
    assert list(layout.shapes) == [tuple(p.shape) for _, p in named]
    assert layout.size == layout.d == sum(p.numel() for _, p in named)
    assert layout.num_bytes == 4 * layout.size
    expected_offsets = np.concatenate([[0], np.cumsum([p.numel() for _, p in named])[:-1]])
    assert list(layout.offsets) == expected_offsets.tolist()

    flat = np.concatenate([p.detach().numpy().ravel() for _, p in named])
    np.testing.assert_array_equal(layout.flatten(module), flat)
    for name, view in layout.split(torch.from_numpy(flat)).items():
        torch.testing.assert_close(view, dict(named)[name].detach(), rtol=0, atol=0)


def test_layout_is_the_same_for_every_build_of_a_config():
    config = DSCNNConfig(channels=(4,), kernel_size=4)
    assert ParamLayout.of(build_model(config, **SHAPE, seed=0)) == ParamLayout.of(build_model(config, **SHAPE, seed=9))


def test_split_of_a_stack_gives_per_row_views():
    module = build_model(MLPConfig(hidden=(6,)), **SHAPE)
    layout = ParamLayout.of(module)
    stack = torch.randn(3, layout.size)
    batched = layout.split(stack)
    for row in range(3):
        for name, tensor in layout.split(stack[row]).items():
            assert batched[name].shape == (3, *layout.shapes[layout.names.index(name)])
            torch.testing.assert_close(batched[name][row], tensor, rtol=0, atol=0)
    stack[1] += 1.0  # views: a write to the stack shows through
    torch.testing.assert_close(batched[layout.names[0]][1], layout.split(stack[1])[layout.names[0]], rtol=0, atol=0)
    first = batched[layout.names[0]][1].reshape(-1)
    torch.testing.assert_close(first, stack[1, : first.numel()], rtol=0, atol=0)


def test_split_works_with_functional_call():
    module = build_model(DSCNNConfig(channels=(4,), kernel_size=3), **SHAPE, seed=3)
    layout = ParamLayout.of(module)
    flat = torch.from_numpy(layout.flatten(module))
    x = torch.randn(2, SHAPE["channels"], SHAPE["window"])
    fresh = build_model(DSCNNConfig(channels=(4,), kernel_size=3), **SHAPE, seed=4)
    out = torch.func.functional_call(fresh, layout.split(flat), (x,))
    torch.testing.assert_close(out, module(x), rtol=0, atol=0)


def test_same_seed_same_init_and_different_seed_different_init():
    config = MLPConfig(hidden=(8,))
    a = init_weights(config, 3, 11, 5, seed=7)
    b = init_weights(config, 3, 11, 5, seed=7)
    c = init_weights(config, 3, 11, 5, seed=8)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_init_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    init_weights(DSCNNConfig(), 3, 11, 5, seed=1)
    build_model(MLPConfig(), 3, 11, 5)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_init_is_not_affected_by_global_rng():
    torch.manual_seed(1)
    a = init_weights(MLPConfig(), 3, 11, 5, seed=5)
    torch.manual_seed(2)
    b = init_weights(MLPConfig(), 3, 11, 5, seed=5)
    np.testing.assert_array_equal(a, b)


def test_modules_with_buffers_are_refused():
    with pytest.raises(ValueError, match="buffers"):
        ParamLayout.of(nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)))


def test_wrong_sizes_are_refused():
    module = build_model(MLPConfig(hidden=(4,)), **SHAPE)
    layout = ParamLayout.of(module)
    with pytest.raises(ValueError):
        layout.load_into(module, np.zeros(layout.size + 1, dtype=np.float32))
    with pytest.raises(ValueError):
        layout.split(torch.zeros(2, layout.size - 1))
    other = build_model(MLPConfig(hidden=(5,)), **SHAPE)
    with pytest.raises(ValueError):
        layout.flatten(other)

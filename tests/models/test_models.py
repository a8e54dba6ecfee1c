"""Model families: registry entries, config parsing, shapes and architecture."""

import numpy as np
import pydantic
import pytest
import torch

from raysim.models import MODELS, DSCNNConfig, MLPConfig, ParamLayout, build_model

ModelConfig = pydantic.TypeAdapter(MODELS.config_union())


def test_both_models_are_registered_and_parse_from_yaml_shaped_dicts():
    assert {"mlp", "dscnn"} <= set(MODELS.names())
    mlp = ModelConfig.validate_python({"name": "mlp", "hidden": [64, 32], "activation": "tanh"})
    assert mlp == MLPConfig(hidden=(64, 32), activation="tanh")
    dscnn = ModelConfig.validate_python({"name": "dscnn", "channels": [8], "kernel_size": 3})
    assert dscnn == DSCNNConfig(channels=(8,), kernel_size=3)
    assert MLPConfig().name == "mlp" and DSCNNConfig().name == "dscnn"


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "mlp", "hidden": [64], "dropout": 0.1},  # unknown key
        {"name": "mlp", "hidden": [0]},  # widths are positive
        {"name": "mlp", "activation": "gelu"},
        {"name": "dscnn", "kernel_size": 0},
        {"name": "resnet"},
    ],
)
def test_bad_model_configs_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError):
        ModelConfig.validate_python(bad)


def test_configs_are_frozen():
    with pytest.raises(pydantic.ValidationError):
        MLPConfig().hidden = (3,)


@pytest.mark.parametrize(
    "config",
    [
        MLPConfig(),
        MLPConfig(hidden=()),
        MLPConfig(hidden=(7, 5), activation="tanh"),
        DSCNNConfig(),
        DSCNNConfig(channels=(3,), kernel_size=4),
        DSCNNConfig(channels=(5, 6, 2), kernel_size=9),
    ],
    ids=repr,
)
@pytest.mark.parametrize("channels,window,classes", [(6, 32, 6), (1, 7, 2), (3, 33, 11), (2, 3, 4)])
def test_output_shape_and_dtype(config, channels, window, classes):
    model = build_model(config, channels, window, classes)
    out = model(torch.randn(5, channels, window))
    assert out.shape == (5, classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hidden", [(), (64,), (16, 8)])
def test_mlp_parameter_count(hidden):
    channels, window, classes = 6, 32, 6
    widths = [channels * window, *hidden, classes]
    expected = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    assert ParamLayout.of(build_model(MLPConfig(hidden=hidden), channels, window, classes)).size == expected


@pytest.mark.parametrize("widths,kernel", [((16, 32), 5), ((4,), 2), ((3, 3, 3), 7)])
def test_dscnn_is_depthwise_separable(widths, kernel):
    channels, classes = 6, 5
    expected = 0
    c_in = channels
    for c_out in widths:
        expected += c_in * kernel + c_in  # depthwise: one k-tap filter and bias per input channel
        expected += c_in * c_out + c_out  # pointwise 1×1
        c_in = c_out
    expected += c_in * classes + classes
    model = build_model(DSCNNConfig(channels=widths, kernel_size=kernel), channels, 21, classes)
    assert ParamLayout.of(model).size == expected
    assert not list(model.buffers())


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("window", [1, 6, 13])
def test_dscnn_same_padding_matches_torch(kernel, window):
    """Each depthwise conv keeps the time length, padded as torch's padding='same'."""
    model = build_model(DSCNNConfig(channels=(4,), kernel_size=kernel), 3, window, 2, seed=1)
    block = model.blocks[0]
    x = torch.randn(2, 3, window)
    same = torch.nn.functional.conv1d(
        x, block.depthwise.weight, block.depthwise.bias, padding="same", groups=3
    )
    expected = torch.relu(torch.nn.functional.conv1d(same, block.pointwise.weight, block.pointwise.bias))
    torch.testing.assert_close(block(x), expected)


def test_mlp_flattens_channels_then_time():
    """Logits of a linear MLP equal W·vec(x) + b with x flattened row-major (channel-major)."""
    model = build_model(MLPConfig(hidden=()), 2, 3, 4, seed=0)
    (weight, bias) = [p.detach() for p in model.parameters()]
    x = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)
    expected = np.asarray(x.reshape(2, 6)) @ np.asarray(weight).T + np.asarray(bias)
    np.testing.assert_allclose(model(x).detach().numpy(), expected, rtol=1e-6, atol=1e-5)


def test_build_model_rejects_empty_dimensions():
    with pytest.raises(ValueError):
        build_model(MLPConfig(), 0, 32, 6)

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raysim.compression import (
    CODECS,
    ErrorFeedback,
    Fp16Config,
    Int8Config,
    NoneConfig,
    QSGDConfig,
    RandKConfig,
    SignConfig,
    TopKConfig,
    encoded_size,
)

modest = settings(max_examples=50, deadline=None)

CONFIGS = [
    NoneConfig(),
    Fp16Config(),
    Int8Config(),
    Int8Config(stochastic=True),
    QSGDConfig(levels=1),
    QSGDConfig(levels=3),
    QSGDConfig(levels=4),
    QSGDConfig(levels=255),
    TopKConfig(k=1),
    TopKConfig(fraction=0.1),
    TopKConfig(fraction=1.0),
    RandKConfig(k=2),
    RandKConfig(fraction=0.25),
    SignConfig(),
]
LAYOUTS = [(1,), (7,), (3, 5), (64, 8, 10, 1), (100, 13), (8, 8, 8, 8)]


def ids(config):
    return "-".join(f"{value}" for value in config.model_dump().values() if value is not None)


def vector(d, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=d) * scale).astype(np.float32)


def build(config, segments):
    return CODECS.build(config, segments)


def round_trip(config, segments, x, seed=0):
    codec = build(config, segments)
    return codec.decode(codec.encode(x, np.random.default_rng(seed)))


def bounds(segments):
    return np.cumsum((0,) + tuple(segments))


def kept(config, d):
    return config.k if config.k is not None else max(1, math.floor(config.fraction * d + 0.5))


def too_few_coordinates(config, segments):
    return getattr(config, "k", None) is not None and config.k > sum(segments)


def documented_size(config, segments):
    """The payload formulas of the module docstring, computed here from scratch."""
    d, count = sum(segments), len(segments)
    if config.name == "none":
        return 4 * d
    if config.name == "fp16":
        return 2 * d
    if config.name == "int8":
        return 8 * count + d
    if config.name == "qsgd":
        return 4 * count + math.ceil(d * (1 + math.ceil(math.log2(config.levels + 1))) / 8)
    if config.name == "topk":
        return 8 * kept(config, d)
    if config.name == "randk":
        return 8 + 4 * kept(config, d)
    if config.name == "sign":
        return 4 * count + math.ceil(d / 8)
    raise AssertionError(config.name)


# --------------------------------------------------------------------------- sizes, shapes, determinism


@pytest.mark.parametrize("segments", LAYOUTS, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_payload_length_is_known_in_advance_and_documented(config, segments):
    x = vector(sum(segments), seed=len(segments))
    if too_few_coordinates(config, segments):
        with pytest.raises(ValueError, match="k="):
            encoded_size(config, segments)
        return
    payload = build(config, segments).encode(x, np.random.default_rng(1))
    assert len(payload) == encoded_size(config, segments) == documented_size(config, segments)


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_decode_is_float32_of_length_d_and_encode_is_seeded(config):
    segments = (30, 9, 1)
    x = vector(40, seed=2)
    codec = build(config, segments)
    payload = codec.encode(x, np.random.default_rng(5))
    assert payload == codec.encode(x, np.random.default_rng(5))
    decoded = codec.decode(payload)
    assert decoded.shape == (40,) and decoded.dtype == np.float32
    decoded[0] = 1.0  # the caller owns the result


@pytest.mark.parametrize(
    "config", [Int8Config(stochastic=True), QSGDConfig(levels=2), RandKConfig(k=10)], ids=ids)
def test_stochastic_codecs_draw_from_the_given_rng(config):
    codec = build(config, (200,))
    x = vector(200, seed=3)
    assert codec.encode(x, np.random.default_rng(1)) != codec.encode(x, np.random.default_rng(2))


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_decodes_non_finite(config, bad):
    x = vector(20)
    x[13] = bad
    assert not np.isfinite(round_trip(config, (10, 10), x)).all()


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_wrong_shapes_and_lengths_are_refused(config):
    codec = build(config, (4, 4))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(np.zeros(9, dtype=np.float32), np.random.default_rng(0))
    payload = codec.encode(np.ones(8, dtype=np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(payload + b"\0")


@st.composite
def layouts_and_updates(draw):
    segments = tuple(draw(st.lists(st.integers(1, 20), min_size=1, max_size=5)))
    x = draw(arrays(np.float32, sum(segments), elements=st.floats(-1e3, 1e3, width=32)))
    return segments, x


@modest
@given(case=layouts_and_updates(), config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**32 - 1))
def test_round_trip_shape_and_size_hold_for_any_layout(case, config, seed):
    segments, x = case
    if too_few_coordinates(config, segments):
        return
    codec = build(config, segments)
    payload = codec.encode(x, np.random.default_rng(seed))
    assert len(payload) == encoded_size(config, segments) == documented_size(config, segments)
    decoded = codec.decode(payload)
    assert decoded.shape == x.shape and decoded.dtype == np.float32
    assert np.isfinite(decoded).all()


# --------------------------------------------------------------------------- lossless and bounded codecs


@pytest.mark.parametrize("segments", LAYOUTS, ids=str)
def test_none_is_bit_exact_and_sends_the_raw_float32_bytes(segments):
    x = vector(sum(segments), scale=1e3)
    x[0] = np.float32(1e-42)  # subnormal
    payload = build(NoneConfig(), segments).encode(x, np.random.default_rng(0))
    assert payload == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(build(NoneConfig(), segments).decode(payload).view(np.uint32), x.view(np.uint32))


def test_topk_with_k_equal_to_d_is_exact():
    x = vector(50)
    np.testing.assert_array_equal(round_trip(TopKConfig(k=50), (20, 30), x), x)
    np.testing.assert_array_equal(round_trip(TopKConfig(fraction=1.0), (20, 30), x), x)


@pytest.mark.parametrize("stochastic", [False, True])
def test_int8_of_constant_segments_is_exact(stochastic):
    x = np.concatenate([np.full(5, 0.3), np.full(7, -12.5), np.full(1, 7e-3)]).astype(np.float32)
    np.testing.assert_array_equal(round_trip(Int8Config(stochastic=stochastic), (5, 7, 1), x), x)


def test_fp16_error_is_within_half_precision_rounding():
    x = np.concatenate([vector(500, scale=s) for s in (1e-6, 1e-3, 1.0, 1e3, 1e4)] + [[65519.0, -65519.0]])
    x = np.clip(x, -65519, 65519).astype(np.float32)
    err = np.abs(round_trip(Fp16Config(), (len(x),), x).astype(np.float64) - x)
    assert (err <= np.maximum(2.0**-11 * np.abs(x.astype(np.float64)), 2.0**-25)).all()


def test_fp16_overflows_to_inf_from_65520():
    x = np.array([65520.0, -70000.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(round_trip(Fp16Config(), (3,), x), [np.inf, -np.inf, 1.0])


def int8_scales(x, segments):
    edges = bounds(segments)
    return np.concatenate([
        np.full(n, (x[a:b].max() - x[a:b].min()) / 255.0)
        for a, b, n in zip(edges[:-1], edges[1:], segments)
    ]).astype(np.float64)


@pytest.mark.parametrize("segments", [(100,), (30, 50, 20), (1, 99)], ids=str)
def test_int8_deterministic_error_is_at_most_half_a_step(segments):
    x = np.concatenate([vector(n, seed=n, scale=10.0**i) for i, n in enumerate(segments)])
    scale = int8_scales(x.astype(np.float64), segments)
    err = np.abs(round_trip(Int8Config(), segments, x).astype(np.float64) - x)
    # Slack: the step is rounded up to float32, and x̂ itself is a float32.
    assert (err <= scale / 2 * (1 + 2**-22) + np.spacing(np.abs(x))).all()
    assert err.max() > 0


def test_int8_stochastic_rounding_is_unbiased_and_within_one_step():
    segments = (20, 12)
    x = vector(32, seed=4)
    scale = int8_scales(x.astype(np.float64), segments)
    codec = build(Int8Config(stochastic=True), segments)
    rng = np.random.default_rng(0)
    draws = np.stack([codec.decode(codec.encode(x, rng)) for _ in range(2000)]).astype(np.float64)
    assert (np.abs(draws - x) <= scale * (1 + 2**-22) + np.spacing(np.abs(x))).all()
    # Each coordinate is a two-point variable one step wide: its std is at most step/2.
    assert (np.abs(draws.mean(0) - x) <= 5 * scale / 2 / math.sqrt(len(draws)) + 1e-6).all()


# --------------------------------------------------------------------------- QSGD


@pytest.mark.parametrize("levels", [1, 4])
def test_qsgd_is_unbiased_with_variance_within_lemma_3_1(levels):
    d, draws_n = 64, 3000
    x = vector(d, seed=levels).astype(np.float64)
    norm = np.linalg.norm(x)
    codec = build(QSGDConfig(levels=levels), (d,))
    rng = np.random.default_rng(1)
    draws = np.stack([codec.decode(codec.encode(x.astype(np.float32), rng)) for _ in range(draws_n)]).astype(np.float64)
    # Every coordinate lies on the grid norm·j/s: its std is at most norm/(2s).
    assert (np.abs(draws.mean(0) - x) <= 5 * norm / (2 * levels) / math.sqrt(draws_n) + 1e-6).all()
    # Variance of stochastic rounding between neighbouring levels: (norm/s)²·p(1 − p), p = frac(s|x|/norm).
    p = np.modf(levels * np.abs(x) / norm)[0]
    exact = ((norm / levels) ** 2 * p * (1 - p)).sum()
    measured = ((draws - x) ** 2).sum(1).mean()
    assert measured == pytest.approx(exact, rel=0.1)
    assert measured <= min(d / levels**2, math.sqrt(d) / levels) * norm**2


def test_qsgd_keeps_signs_and_per_segment_norms():
    segments = (10, 30)
    x = np.concatenate([vector(10, seed=1, scale=100.0), vector(30, seed=2, scale=0.01)])
    decoded = round_trip(QSGDConfig(levels=7), segments, x).astype(np.float64)
    assert (decoded * x >= 0).all()
    for a, b in zip(bounds(segments)[:-1], bounds(segments)[1:]):
        # Levels are multiples of norm/s no larger than norm.
        norm = np.linalg.norm(x[a:b].astype(np.float64))
        steps = np.abs(decoded[a:b]) / norm * 7
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        assert (steps <= 7 + 1e-4).all()


def test_qsgd_of_a_zero_segment_is_zero():
    x = np.concatenate([np.zeros(5), vector(5)]).astype(np.float32)
    decoded = round_trip(QSGDConfig(levels=2), (5, 5), x)
    np.testing.assert_array_equal(decoded[:5], 0.0)


# --------------------------------------------------------------------------- sparsifiers


@modest
@given(x=arrays(np.float32, st.integers(1, 60), elements=st.floats(-1e3, 1e3, width=32)),
       fraction=st.floats(0.01, 1.0))
def test_topk_is_a_k_over_d_contraction(x, fraction):
    d = len(x)
    config = TopKConfig(fraction=fraction)
    k = kept(config, d)
    decoded = round_trip(config, (d,), x).astype(np.float64)
    x64 = x.astype(np.float64)
    assert np.count_nonzero(decoded) <= k
    assert ((decoded == 0) | (decoded == x64)).all()
    total = (x64**2).sum()
    assert ((x64 - decoded) ** 2).sum() <= (1 - k / d) * total + 1e-9 * total


def test_topk_keeps_the_largest_magnitudes():
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.05], dtype=np.float32)
    np.testing.assert_array_equal(round_trip(TopKConfig(k=2), (6,), x), [0, -5.0, 0, 3.0, 0, 0])


def test_randk_is_unbiased():
    d, k, draws_n = 40, 8, 4000
    x = vector(d, seed=6).astype(np.float64)
    codec = build(RandKConfig(k=k), (25, 15))
    rng = np.random.default_rng(2)
    draws = np.stack([codec.decode(codec.encode(x.astype(np.float32), rng)) for _ in range(draws_n)]).astype(np.float64)
    assert ((draws != 0).sum(1) <= k).all()
    # x̂_i is (d/k)·x_i with probability k/d, else 0: variance x_i²·(d/k − 1).
    std_error = np.abs(x) * math.sqrt((d / k - 1) / draws_n)
    assert (np.abs(draws.mean(0) - x) <= 5 * std_error + 1e-6).all()
    nonzero = draws != 0
    np.testing.assert_allclose(draws[nonzero], (np.broadcast_to(x, draws.shape) * d / k)[nonzero], rtol=1e-6)


# --------------------------------------------------------------------------- sign


def test_sign_keeps_signs_and_per_segment_mean_magnitude():
    segments = (9, 20, 3)
    x = np.concatenate([vector(9, seed=1), vector(20, seed=2, scale=50.0), vector(3, seed=3, scale=1e-3)])
    x[4] = 0.0
    decoded = round_trip(SignConfig(), segments, x)
    np.testing.assert_array_equal(np.sign(decoded), np.where(x >= 0, 1.0, -1.0))
    for a, b in zip(bounds(segments)[:-1], bounds(segments)[1:]):
        np.testing.assert_allclose(np.abs(decoded[a:b]), np.abs(x[a:b].astype(np.float64)).mean(), rtol=1e-6)


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("config", [TopKConfig(fraction=0.1), SignConfig(), QSGDConfig(levels=2)], ids=ids)
def test_error_feedback_delays_but_never_loses_mass(config):
    segments = (30, 20)
    feedback = ErrorFeedback(build(config, segments), 50)
    rng = np.random.default_rng(0)
    updates = [vector(50, seed=t) for t in range(25)]
    decoded = [feedback.codec.decode(feedback.send(7, u, rng)) for u in updates]
    total = np.sum(updates, axis=0, dtype=np.float64)
    received = np.sum(decoded, axis=0, dtype=np.float64) + feedback.residual(7)
    np.testing.assert_allclose(received, total, atol=1e-4 * np.abs(total).max())
    assert np.abs(feedback.residual(7)).max() > 0


def test_error_feedback_keeps_one_residual_per_key_starting_at_zero():
    codec = build(TopKConfig(k=1), (4,))
    feedback = ErrorFeedback(codec, 4)
    np.testing.assert_array_equal(feedback.residual(3), np.zeros(4))
    x = np.array([4.0, 1.0, -2.0, 0.5], dtype=np.float32)
    payload = feedback.send(3, x, np.random.default_rng(0))
    np.testing.assert_array_equal(codec.decode(payload), [4.0, 0, 0, 0])
    np.testing.assert_array_equal(feedback.residual(3), [0, 1.0, -2.0, 0.5])
    np.testing.assert_array_equal(feedback.residual(5), np.zeros(4))
    # The residual is added before encoding: -2 + -2 now beats the new 3.
    payload = feedback.send(3, np.array([0, 0, -2.0, 3.0], dtype=np.float32), np.random.default_rng(0))
    np.testing.assert_array_equal(codec.decode(payload), [0, 0, -4.0, 0])
    np.testing.assert_array_equal(feedback.residual(3), [0, 1.0, 0, 3.5])


def test_error_feedback_state_round_trips_through_a_checkpoint():
    codec = build(QSGDConfig(levels=1), (6, 6))
    live = ErrorFeedback(codec, 12)
    for key in (1, 2):
        live.send(key, vector(12, seed=key), np.random.default_rng(key))
    restored = ErrorFeedback(codec, 12)
    restored.load({key: value.copy() for key, value in live.state().items()})
    assert set(restored.state()) == {1, 2}
    update = vector(12, seed=9)
    assert restored.send(2, update, np.random.default_rng(4)) == live.send(2, update, np.random.default_rng(4))
    with pytest.raises(ValueError, match="shape"):
        restored.load({1: np.zeros(11)})


def test_error_feedback_restarts_after_a_non_finite_update():
    feedback = ErrorFeedback(build(SignConfig(), (8,)), 8)
    feedback.send(0, vector(8), np.random.default_rng(0))
    bad = vector(8)
    bad[2] = np.nan
    assert not np.isfinite(feedback.codec.decode(feedback.send(0, bad, np.random.default_rng(0)))).all()
    np.testing.assert_array_equal(feedback.residual(0), np.zeros(8))


# --------------------------------------------------------------------------- configuration errors


def test_k_larger_than_d_is_a_clear_error():
    with pytest.raises(ValueError, match=r"k=11.*d=10"):
        build(TopKConfig(k=11), (4, 6))
    with pytest.raises(ValueError, match=r"k=11.*d=10"):
        encoded_size(RandKConfig(k=11), (4, 6))


@pytest.mark.parametrize("raw", [
    {"name": "qsgd", "levels": 0},
    {"name": "qsgd"},
    {"name": "topk", "fraction": 0.0},
    {"name": "topk", "fraction": 1.5},
    {"name": "randk", "fraction": -0.1},
    {"name": "topk", "k": 0},
    {"name": "topk"},
    {"name": "topk", "k": 3, "fraction": 0.5},
    {"name": "int8", "bits": 4},
], ids=str)
def test_bad_configs_are_rejected_when_loaded(raw):
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(CODECS.config_union()).validate_python(raw)


def test_unknown_codec_name_lists_the_choices():
    with pytest.raises(KeyError) as error:
        CODECS.entry("gzip")
    for name in ("none", "fp16", "int8", "qsgd", "topk", "randk", "sign"):
        assert name in str(error.value)


@pytest.mark.parametrize("segments", [(), (4, 0)], ids=str)
def test_empty_segments_are_refused(segments):
    with pytest.raises(ValueError, match="segment"):
        build(NoneConfig(), segments)

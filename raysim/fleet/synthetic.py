"""Seeded synthetic human-activity-like sensor windows.

Each class has a template per channel, shared by the whole fleet: a mixture of
three sinusoids common to all classes plus two or three sinusoids with
class-specific frequencies, amplitudes and phases, and a class/channel offset
μ_c. A sample of class c on sensor i is

    x = g_i ⊙ R_i · (μ_c + a · w_c(t + s) + ε) + b_i

with w_c the sinusoid mixture, a random time shift s, an amplitude jitter a,
coloured noise ε (AR(1) filtered Gaussian at the sensor's noise level σ_i),
and the sensor's
calibration ("feature skew"): a small 3-D rotation R_i of every consecutive
channel triple (like accelerometer xyz), a per-channel gain g_i and bias b_i.

Heterogeneity across sensors follows the usual non-IID recipes:

* label skew: sensor i's class proportions p_i ~ Dirichlet(α·1_C), the
  per-client symmetric convention of Hsu, Qi & Brown, "Measuring the effects of
  non-identical data distribution for federated visual classification" (2019);
  small α gives each sensor few classes, large α near-uniform classes;
* quantity skew: n_i = max(min_samples, round(samples_per_sensor · exp(σ_q·z))),
  z ~ N(0, 1), so samples_per_sensor is the median and σ_q = 0 gives exactly
  samples_per_sensor;
* feature skew: gain exp(N(0, gain_sigma)), bias N(0, bias_sigma), rotation
  angles U(-rotation_deg, rotation_deg) per axis, noise σ_i ~ U(noise_min, noise_max).

Every random draw comes from ``np.random.default_rng([seed, stream, id, part])``,
so a sensor's data depends only on (seed, sensor id), never on how many sensors
are generated or in which order. Held-out test sensors use their own stream code
and the id range starting at :data:`TEST_SENSOR_ID_BASE`, so they never share
data or ids with fleet sensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    from raysim.scenario import FeatureSkew, SyntheticData

# Stream codes: the second word of every seed sequence, one per kind of draw.
_TEMPLATE_STREAM = 101
_SENSOR_STREAM = 102
_TEST_SENSOR_STREAM = 103
_TEST_LAYOUT_STREAM = 104
_PROXY_STREAM = 105
_VALIDATION_STREAM = 106
_PROXY_PER_SENSOR = 50  # proxy samples drawn per unseen proxy sensor

# Parts of one sensor's stream, so each quantity can be drawn on its own.
_PART_QUANTITY = 0
_PART_LABELS = 1
_PART_SAMPLES = 2  # calibration first, then the windows

TEST_SENSOR_ID_BASE = 1 << 40
"""Sensor id of the first held-out test sensor; test sensor j has id base + j."""

# Difficulty of the task. Tuned so that a centralized one-hidden-layer MLP (64
# units) reaches roughly 80-95 % test accuracy on the defaults (6 classes,
# 6 channels, window 32, 2000 test samples from unseen sensors).
_FREQ_RANGE = (0.5, 3.0)  # sinusoid frequencies, cycles per window
_AMPLITUDE_RANGE = (0.3, 1.0)
_OFFSET_SIGMA = 0.25  # class/channel offset ~ N(0, _OFFSET_SIGMA)
_SEPARATION = 0.15  # scale of the class-specific part of each template
_MAX_SHIFT = 0.5  # random time shift ~ U(0, _MAX_SHIFT · window) samples
_AMPLITUDE_JITTER = 0.2  # per-sample amplitude factor exp(N(0, _AMPLITUDE_JITTER))
_AR_COEF = 0.7  # AR(1) coefficient of the coloured noise


def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    # SeedSequence words must be non-negative; map any int64 id onto uint64.
    words = [int(seed), stream, *(int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in key)]
    return np.random.default_rng(words)


@dataclass(frozen=True, eq=False)
class Templates:
    """Class templates shared by the fleet: ``(classes, channels, components)`` arrays.

    Components 0-2 are shared by every class, 3-5 are the class's own.
    """

    frequency: np.ndarray  # cycles per window
    amplitude: np.ndarray  # 0 for an unused third component
    phase: np.ndarray  # radians
    offset: np.ndarray  # (classes, channels)


def templates(cfg: "SyntheticData", seed: int) -> Templates:
    """The class templates of a fleet, drawn from the seed alone.

    Each channel has a mixture of three sinusoids shared by every class (the
    "posture" common to all activities) plus a class-specific mixture of two or
    three sinusoids and offset, scaled by the class separation; that scale sets
    how hard the classes are to tell apart under noise and time shifts.
    """
    rng = _rng(seed, _TEMPLATE_STREAM)
    classes, channels = cfg.classes, cfg.channels
    shared = (1, channels, 3)
    own = (classes, channels, 3)
    frequency = np.concatenate(
        [np.broadcast_to(rng.uniform(*_FREQ_RANGE, size=shared), own), rng.uniform(*_FREQ_RANGE, size=own)], axis=2
    )
    base_amplitude = rng.uniform(*_AMPLITUDE_RANGE, size=shared)
    class_amplitude = _SEPARATION * rng.uniform(*_AMPLITUDE_RANGE, size=own)
    class_amplitude[..., 2] *= rng.integers(2, 4, size=own[:2]) == 3
    amplitude = np.concatenate([np.broadcast_to(base_amplitude, own), class_amplitude], axis=2)
    phase = np.concatenate(
        [np.broadcast_to(rng.uniform(0.0, 2 * np.pi, size=shared), own), rng.uniform(0.0, 2 * np.pi, size=own)],
        axis=2,
    )
    offset = _SEPARATION * rng.normal(0.0, _OFFSET_SIGMA, size=own[:2])
    return Templates(frequency, amplitude, phase, offset)


def _quantity(cfg: "SyntheticData", seed: int, sensor_id: int) -> int:
    z = _rng(seed, _SENSOR_STREAM, sensor_id, _PART_QUANTITY).standard_normal()
    return max(cfg.min_samples, int(round(cfg.samples_per_sensor * np.exp(cfg.quantity_sigma * z))))


def num_samples(cfg: "SyntheticData", seed: int, sensor_ids: Iterable[int]) -> np.ndarray:
    """Sample count n_i of each sensor (lognormal quantity skew), as int64."""
    return np.array([_quantity(cfg, seed, int(i)) for i in np.asarray(sensor_ids).reshape(-1)], dtype=np.int64)


def _proportions(cfg: "SyntheticData", rng: np.random.Generator) -> np.ndarray:
    p = rng.dirichlet(np.full(cfg.classes, cfg.label_alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        # Very small α can underflow every gamma draw to 0: the limit is one class.
        p = np.zeros(cfg.classes)
        p[rng.integers(cfg.classes)] = 1.0
    return p


def class_proportions(cfg: "SyntheticData", seed: int, sensor_id: int) -> np.ndarray:
    """Sensor i's class proportions p_i ~ Dirichlet(label_alpha · 1_C) (Hsu et al. 2019)."""
    return _proportions(cfg, _rng(seed, _SENSOR_STREAM, sensor_id, _PART_LABELS))


@dataclass(frozen=True, eq=False)
class Calibration:
    """One sensor's feature skew."""

    gain: np.ndarray  # (channels,)
    bias: np.ndarray  # (channels,)
    rotation: np.ndarray  # (channels // 3, 3, 3) rotation matrices, one per full triple
    noise: float  # σ_i, marginal std of the coloured noise


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rz(γ) · Ry(β) · Rx(α) for each row (α, β, γ) of ``angles`` (radians)."""
    a, b, g = angles[:, 0], angles[:, 1], angles[:, 2]
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    r = np.empty((len(angles), 3, 3))
    r[:, 0, 0] = cg * cb
    r[:, 0, 1] = cg * sb * sa - sg * ca
    r[:, 0, 2] = cg * sb * ca + sg * sa
    r[:, 1, 0] = sg * cb
    r[:, 1, 1] = sg * sb * sa + cg * ca
    r[:, 1, 2] = sg * sb * ca - cg * sa
    r[:, 2, 0] = -sb
    r[:, 2, 1] = cb * sa
    r[:, 2, 2] = cb * ca
    return r


def _calibration(skew: "FeatureSkew", channels: int, rng: np.random.Generator) -> Calibration:
    gain = np.exp(rng.normal(0.0, skew.gain_sigma, size=channels))
    bias = rng.normal(0.0, skew.bias_sigma, size=channels)
    limit = np.deg2rad(skew.rotation_deg)
    angles = rng.uniform(-limit, limit, size=(channels // 3, 3))
    noise = float(rng.uniform(skew.noise_min, skew.noise_max))
    return Calibration(gain, bias, _rotation(angles), noise)


def calibration(cfg: "SyntheticData", seed: int, sensor_id: int) -> Calibration:
    """Fleet sensor ``sensor_id``'s feature skew."""
    return _calibration(cfg.feature_skew, cfg.channels, _rng(seed, _SENSOR_STREAM, sensor_id, _PART_SAMPLES))


_AR_MATRIX_MAX_WINDOW = 512  # up to this window the AR(1) filter is one matrix product


@functools.lru_cache(maxsize=8)
def _ar1_filter(window: int) -> np.ndarray:
    # e = w · Lᵀ with L[t, s] = ρ^(t-s)·√(1-ρ²) for 0 < s ≤ t and L[t, 0] = ρ^t.
    lag = np.arange(window)[:, None] - np.arange(window)[None, :]
    filt = np.where(lag >= 0, _AR_COEF ** np.maximum(lag, 0), 0.0) * np.sqrt(1.0 - _AR_COEF**2)
    filt[:, 0] = _AR_COEF ** np.arange(window)
    transposed = np.ascontiguousarray(filt.T)
    transposed.flags.writeable = False
    return transposed


def _ar1_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Stationary AR(1) noise along the last axis with marginal std ``sigma``.

        e_0 = w_0,   e_t = ρ·e_{t-1} + √(1-ρ²)·w_t,   w ~ N(0, 1)
    """
    innovations = rng.standard_normal(shape)
    window = shape[-1]
    scale = np.sqrt(1.0 - _AR_COEF**2)
    if window <= _AR_MATRIX_MAX_WINDOW:
        return sigma * (innovations @ _ar1_filter(window))
    out = np.empty(shape)
    out[..., 0] = innovations[..., 0]
    for t in range(1, window):
        out[..., t] = _AR_COEF * out[..., t - 1] + scale * innovations[..., t]
    return sigma * out


def _waves(tpl: Templates, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A·sin(2πf·t/T + φ) and A·cos(2πf·t/T + φ): (classes, channels, components, window)."""
    t = np.arange(window, dtype=np.float64)
    arg = 2 * np.pi * tpl.frequency[..., None] * t / window + tpl.phase[..., None]
    return tpl.amplitude[..., None] * np.sin(arg), tpl.amplitude[..., None] * np.cos(arg)


def _render(
    cfg: "SyntheticData",
    tpl: Templates,
    waves: tuple[np.ndarray, np.ndarray],
    labels: np.ndarray,
    cal: Calibration,
    rng: np.random.Generator,
) -> np.ndarray:
    n, channels, window = len(labels), cfg.channels, cfg.window
    shift = rng.uniform(0.0, _MAX_SHIFT * window, size=(n, 1, 1))
    jitter = np.exp(rng.normal(0.0, _AMPLITUDE_JITTER, size=(n, 1, 1)))
    # sin(a + θ) = sin a·cos θ + cos a·sin θ, with θ = 2πf·s/T: no sin over the full array.
    theta = 2 * np.pi * tpl.frequency[labels] * shift / window  # (n, channels, components)
    sin_wave, cos_wave = waves
    signal = np.einsum("nck,nckt->nct", np.cos(theta), sin_wave[labels])
    signal += np.einsum("nck,nckt->nct", np.sin(theta), cos_wave[labels])
    x = tpl.offset[labels][..., None] + jitter * signal
    x += _ar1_noise(rng, (n, channels, window), cal.noise)
    triples = 3 * len(cal.rotation)
    if triples:
        grouped = x[:, :triples].reshape(n, -1, 3, window)
        x[:, :triples] = np.einsum("gij,ngjt->ngit", cal.rotation, grouped).reshape(n, triples, window)
    x = x * cal.gain[None, :, None] + cal.bias[None, :, None]
    return x.astype(np.float32)


def _sensor(
    cfg: "SyntheticData", seed: int, tpl: Templates, waves: tuple[np.ndarray, np.ndarray], sensor_id: int
) -> tuple[np.ndarray, np.ndarray]:
    n = _quantity(cfg, seed, sensor_id)
    label_rng = _rng(seed, _SENSOR_STREAM, sensor_id, _PART_LABELS)
    p = _proportions(cfg, label_rng)
    labels = label_rng.choice(cfg.classes, size=n, p=p)
    sample_rng = _rng(seed, _SENSOR_STREAM, sensor_id, _PART_SAMPLES)
    cal = _calibration(cfg.feature_skew, cfg.channels, sample_rng)
    x = _render(cfg, tpl, waves, labels, cal, sample_rng)
    return x, labels.astype(np.int64)


def sensor_samples(cfg: "SyntheticData", seed: int, sensor_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Fleet sensor ``sensor_id``'s windows ``x`` (n, channels, window) float32 and labels ``y`` (n,) int64."""
    tpl = templates(cfg, seed)
    return _sensor(cfg, seed, tpl, _waves(tpl, cfg.window), int(sensor_id))


def iter_sensors(
    cfg: "SyntheticData", seed: int, sensor_ids: Iterable[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(sensor_id, x, y)`` for each id in turn, sharing one set of templates."""
    tpl = templates(cfg, seed)
    waves = _waves(tpl, cfg.window)
    for sensor_id in sensor_ids:
        x, y = _sensor(cfg, seed, tpl, waves, int(sensor_id))
        yield int(sensor_id), x, y


def test_layout(cfg: "SyntheticData", seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and test-sensor index (0 … test_sensors-1) of every held-out sample.

    Labels are class-balanced (counts differ by at most one), shuffled, and
    dealt round-robin to the test sensors, so every test sensor sees a mix.
    """
    rng = _rng(seed, _TEST_LAYOUT_STREAM)
    labels = rng.permutation(np.arange(cfg.test_samples) % cfg.classes)
    owner = np.arange(cfg.test_samples) % cfg.test_sensors
    return labels.astype(np.int64), owner.astype(np.int64)


def iter_test_sensors(cfg: "SyntheticData", seed: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(sensor_id, x, y)`` of each held-out test sensor, ids from :data:`TEST_SENSOR_ID_BASE`."""
    tpl = templates(cfg, seed)
    waves = _waves(tpl, cfg.window)
    labels, owner = test_layout(cfg, seed)
    for j in range(cfg.test_sensors):
        mine = labels[owner == j]
        if len(mine) == 0:
            continue
        rng = _rng(seed, _TEST_SENSOR_STREAM, j, _PART_SAMPLES)
        cal = _calibration(cfg.feature_skew, cfg.channels, rng)
        x = _render(cfg, tpl, waves, mine, cal, rng)
        yield TEST_SENSOR_ID_BASE + j, x, mine


def test_set(cfg: "SyntheticData", seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out ``(x, y, sensor)``: ``test_samples`` class-balanced windows from ``test_sensors`` unseen sensors."""
    parts = list(iter_test_sensors(cfg, seed))
    x = np.concatenate([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts])
    sensor = np.concatenate([np.full(len(p[2]), p[0], dtype=np.int64) for p in parts])
    return x, y, sensor


def validation_set(cfg: "SyntheticData", seed: int, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A labelled validation set ``(x, y, sensor)`` drawn like the held-out set from its own unseen sensors
    (50 samples each, class-balanced): apart from the fleet, the test set and the proxy set."""
    return _unseen_sensors(cfg, seed, samples, _VALIDATION_STREAM)


def proxy_set(cfg: "SyntheticData", seed: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """A public unlabeled proxy set: ``samples`` windows (C, T) from unseen proxy sensors of the same domain,
    and the proxy sensor each comes from (0, 1, ...).

    Drawn like the held-out set (class-balanced, 50 samples per proxy sensor,
    each proxy sensor with its own calibration) but from its own stream, so
    it shares no sample with the fleet or the test set; the labels are dropped.
    """
    x, _, sensor = _unseen_sensors(cfg, seed, samples, _PROXY_STREAM)
    return x, sensor


def _unseen_sensors(cfg: "SyntheticData", seed: int, samples: int, stream_code: int):
    """``samples`` class-balanced windows from unseen sensors of stream ``stream_code``, 50 per sensor,
    each sensor with its own calibration: ``(x, y, sensor index)``."""
    tpl = templates(cfg, seed)
    waves = _waves(tpl, cfg.window)
    labels = _rng(seed, stream_code).permutation(np.arange(samples) % cfg.classes)
    parts = []
    for j, start in enumerate(range(0, samples, _PROXY_PER_SENSOR)):
        rng = _rng(seed, stream_code, j, _PART_SAMPLES)
        cal = _calibration(cfg.feature_skew, cfg.channels, rng)
        parts.append(_render(cfg, tpl, waves, labels[start : start + _PROXY_PER_SENSOR], cal, rng))
    sensor = np.concatenate([np.full(len(p), j, dtype=np.int64) for j, p in enumerate(parts)])
    return np.concatenate(parts).astype(np.float32), labels.astype(np.int64), sensor


# pytest would otherwise try to collect these as tests when imported into a test module.
test_layout.__test__ = False  # type: ignore[attr-defined]
test_set.__test__ = False  # type: ignore[attr-defined]
iter_test_sensors.__test__ = False  # type: ignore[attr-defined]

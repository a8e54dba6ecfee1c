"""Update codecs: a flat float32 update → the exact bytes a sensor uploads → the update the server sees.

Encode → transmit → decode, as in FLSim. A codec is built for one model from
the lengths of its parameter tensors, ``segments`` (``ParamLayout.numels``,
summing to d), so per-tensor schemes keep one scale per tensor. Every codec
here has a payload length fixed by the config and the segments, known before
encoding (:func:`encoded_size`), which the virtual clock charges as upload
time. With S = len(segments), s QSGD levels and b = ⌈log₂(s+1)⌉:

    name   payload bytes         decode
    none   4d                    exact
    fp16   2d                    |x − x̂| ≤ max(2⁻¹¹|x|, 2⁻²⁵) for |x| < 65520
    int8   8S + d                |x − x̂| ≤ scale/2; stochastic: unbiased, |x − x̂| < scale
    qsgd   4S + ⌈d(1 + b)/8⌉     unbiased, E‖x − x̂‖² ≤ min(d/s², √d/s)·‖x‖²
    topk   8k                    ‖x − x̂‖² ≤ (1 − k/d)·‖x‖²
    randk  8 + 4k                unbiased
    sign   4S + ⌈d/8⌉            per tensor: mean |x| · sign(x)

Multi-byte fields are little-endian. A non-finite update always decodes to a
non-finite vector, so the validation stage rejects it as ``non_finite``. Pure
numpy; the only randomness is the ``rng`` passed to ``encode``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, Field, PositiveInt, model_validator

from raysim.registry import PluginConfig, Registry


class Codec(Protocol):
    """Turns a flat float32 update into bytes on the wire and back."""

    @property
    def payload_bytes(self) -> int | None:
        """The length of every payload, or None for a codec whose payloads vary in length."""
        ...

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        """The payload for ``update``, a float32 (d,) vector; stochastic codecs draw only from ``rng``."""
        ...

    def decode(self, payload: bytes) -> np.ndarray:
        """The float32 (d,) update the server reconstructs from ``payload``."""
        ...


CODECS: Registry[Codec] = Registry("compression.uplink")


def encoded_size(config: BaseModel, segments: Sequence[int]) -> int | None:
    """Length in bytes of every payload ``config``'s codec sends for a model of these segments.

    None would mean the length is only known after encoding; every codec here
    is fixed-size. A config the segments cannot honour (k > d) is a ValueError.
    """
    return CODECS.build(config, tuple(segments)).payload_bytes


# --------------------------------------------------------------------------- configs


class NoneConfig(PluginConfig):
    """No compression: the raw little-endian float32 vector, 4d bytes."""

    name: Literal["none"] = "none"


class Fp16Config(PluginConfig):
    """IEEE 754 binary16 cast, round to nearest even: 2d bytes."""

    name: Literal["fp16"] = "fp16"


class Int8Config(PluginConfig):
    """Per-tensor affine 8-bit quantization (Jacob et al., CVPR 2018): 8S + d bytes."""

    name: Literal["int8"] = "int8"
    # Round up with probability equal to the fraction, which makes the decode unbiased
    # (Gupta et al., ICML 2015; Konečný et al. 2016, "probabilistic quantization").
    stochastic: bool = False


class QSGDConfig(PluginConfig):
    """QSGD, s levels per tensor (Alistarh et al., NeurIPS 2017): 4S + ⌈d(1 + b)/8⌉ bytes, b = ⌈log₂(s+1)⌉."""

    name: Literal["qsgd"] = "qsgd"
    # s: quantization levels. At most 2³¹ − 1 keeps 1 + b ≤ 32 bits per coordinate, never more than float32.
    levels: int = Field(ge=1, le=2**31 - 1)


class _SparseConfig(PluginConfig):
    """How many coordinates a sparsifier sends: exactly one of ``fraction`` and ``k``."""

    fraction: Optional[float] = Field(None, gt=0, le=1)  # k = max(1, ⌊fraction·d + ½⌋)
    k: Optional[PositiveInt] = None  # a fixed k, which must not exceed d

    @model_validator(mode="after")
    def _one_of_fraction_and_k(self) -> "_SparseConfig":
        if (self.fraction is None) == (self.k is None):
            raise ValueError("give exactly one of fraction and k")
        return self

    def kept(self, size: int) -> int:
        """k for an update of ``size`` = d coordinates; ValueError if a fixed k exceeds d."""
        if self.k is None:
            return max(1, math.floor(self.fraction * size + 0.5))
        if self.k > size:
            raise ValueError(f"{self.name} keeps k={self.k} coordinates, but the model has only d={size}")
        return self.k


class TopKConfig(_SparseConfig):
    """The k largest-magnitude coordinates (Aji & Heafield, EMNLP 2017; Stich et al., NeurIPS 2018): 8k bytes."""

    name: Literal["topk"] = "topk"


class RandKConfig(_SparseConfig):
    """k uniformly random coordinates scaled by d/k (Stich et al., NeurIPS 2018): 8 + 4k bytes."""

    name: Literal["randk"] = "randk"


class SignConfig(PluginConfig):
    """Scaled sign per tensor (Karimireddy et al., ICML 2019): 4S + ⌈d/8⌉ bytes."""

    name: Literal["sign"] = "sign"


# --------------------------------------------------------------------------- codecs


class _Segmented:
    """A codec for one model: the lengths of its parameter tensors in flat order, summing to d = ``size``."""

    def __init__(self, config: BaseModel, segments: Sequence[int]) -> None:
        segments = tuple(int(n) for n in segments)
        if not segments or min(segments) < 1:
            raise ValueError(f"a codec needs one or more segments, each of length >= 1; got {segments}")
        self.config = config
        self.segments = segments
        self.size = sum(segments)
        self.starts = np.cumsum((0,) + segments[:-1])

    def _flat(self, update: np.ndarray) -> np.ndarray:
        update = np.asarray(update, dtype=np.float32)
        if update.shape != (self.size,):
            raise ValueError(f"{self.config.name} codec expects an update of shape ({self.size},), got {update.shape}")
        return update

    def _checked(self, payload: bytes) -> bytes:
        if len(payload) != self.payload_bytes:
            raise ValueError(
                f"{self.config.name} payload for d={self.size} must be {self.payload_bytes} bytes, got {len(payload)}")
        return payload

    def _per_coordinate(self, per_segment: np.ndarray) -> np.ndarray:
        """Each segment's value repeated over its coordinates."""
        return np.repeat(per_segment, self.segments)

    def _finite_segments(self, update: np.ndarray) -> np.ndarray:
        return np.logical_and.reduceat(np.isfinite(update), self.starts)


@CODECS.register("none", NoneConfig)
class Float32(_Segmented):
    """Lossless passthrough: the update's little-endian float32 bytes, 4d bytes."""

    @property
    def payload_bytes(self) -> int:
        return 4 * self.size

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        return self._flat(update).astype("<f4").tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        return np.frombuffer(self._checked(payload), dtype="<f4").astype(np.float32)


@CODECS.register("fp16", Fp16Config)
class Float16(_Segmented):
    """Half precision: x̂ = binary16(x), round to nearest even, 2d bytes.

    |x − x̂| ≤ 2⁻¹¹·|x| for normal halves (|x| ≥ 2⁻¹⁴) and ≤ 2⁻²⁵ below;
    |x| ≥ 65520 overflows to ±inf and is rejected downstream as non-finite.
    """

    @property
    def payload_bytes(self) -> int:
        return 2 * self.size

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        with np.errstate(over="ignore"):
            return self._flat(update).astype("<f2").tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        return np.frombuffer(self._checked(payload), dtype="<f2").astype(np.float32)


@CODECS.register("int8", Int8Config)
class Int8(_Segmented):
    """Per-tensor affine 8-bit quantization (Jacob et al., CVPR 2018), 8S + d bytes.

        lo = min x,  scale = (max x − lo)/255,  q = round((x − lo)/scale) ∈ [0, 255],  x̂ = lo + scale·q

    per segment. Payload: S pairs (lo, scale) as float32, then the d bytes q.
    scale is rounded up to float32 so q never clips, which keeps |x − x̂| ≤ scale/2
    (up to x̂'s own float32 rounding); a constant segment has scale 0 and decodes
    exactly. Stochastic rounding q = ⌊t + u⌋, u ~ U[0, 1), is unbiased with
    |x − x̂| < scale. A non-finite segment is sent as lo = scale = NaN.
    """

    @property
    def payload_bytes(self) -> int:
        return 8 * len(self.segments) + self.size

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        x = self._flat(update)
        finite = self._finite_segments(x)
        lo = np.where(finite, np.minimum.reduceat(x, self.starts), np.nan).astype(np.float32)
        spread = np.maximum.reduceat(x, self.starts).astype(np.float64) - lo
        scale = np.where(finite, spread / 255.0, np.nan)
        scale32 = scale.astype(np.float32)
        scale32 = np.where(scale32 < scale, np.nextafter(scale32, np.float32(np.inf)), scale32)
        step = self._per_coordinate(scale32.astype(np.float64))
        t = np.divide(x - self._per_coordinate(lo.astype(np.float64)), step,
                      out=np.zeros(self.size), where=step > 0)
        q = np.floor(t + rng.random(self.size)) if self.config.stochastic else np.rint(t)
        header = np.stack([lo, scale32], axis=1).astype("<f4")
        return header.tobytes() + np.clip(q, 0, 255).astype(np.uint8).tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        payload = self._checked(payload)
        header = np.frombuffer(payload, dtype="<f4", count=2 * len(self.segments)).reshape(-1, 2).astype(np.float64)
        q = np.frombuffer(payload, dtype=np.uint8, offset=8 * len(self.segments))
        return (self._per_coordinate(header[:, 0]) + self._per_coordinate(header[:, 1]) * q).astype(np.float32)


@CODECS.register("qsgd", QSGDConfig)
class QSGD(_Segmented):
    """QSGD (Alistarh et al., NeurIPS 2017, "Communication-Efficient SGD via Gradient Quantization and Encoding").

        x̂_i = ‖x‖₂ · sign(x_i) · ℓ_i / s,   ℓ_i = ⌊s·|x_i|/‖x‖₂ + u_i⌋,  u_i ~ U[0, 1)

    with one bucket per segment (the paper's buckets, cut at tensor boundaries),
    so E[x̂] = x and E‖x̂ − x‖² ≤ min(d/s², √d/s)·‖x‖² (Lemma 3.1). Payload: S
    norms as float32, then one bit string packed MSB first (np.packbits): d sign
    bits (1 = negative), then d levels of b = ⌈log₂(s+1)⌉ bits each, MSB first —
    4S + ⌈d(1 + b)/8⌉ bytes. A non-finite segment is sent as norm NaN.
    """

    def __init__(self, config: QSGDConfig, segments: Sequence[int]) -> None:
        super().__init__(config, segments)
        self.bits = config.levels.bit_length()  # = ⌈log₂(s+1)⌉
        self.shifts = np.arange(self.bits - 1, -1, -1, dtype=np.uint32)
        self.place_values = np.exp2(self.shifts)

    @property
    def payload_bytes(self) -> int:
        return 4 * len(self.segments) + -(-self.size * (1 + self.bits) // 8)

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        x = self._flat(update).astype(np.float64)
        s = self.config.levels
        norms = np.sqrt(np.add.reduceat(x * x, self.starts))
        norms32 = np.where(self._finite_segments(x), norms, np.nan).astype("<f4")
        # Levels are drawn against the norm as sent, so the decode is unbiased.
        norm = self._per_coordinate(norms32.astype(np.float64))
        ratio = np.divide(s * np.abs(x), norm, out=np.zeros(self.size), where=norm > 0)
        levels = np.minimum(np.floor(ratio + rng.random(self.size)), s).astype(np.uint32)
        level_bits = (levels[:, None] >> self.shifts) & 1
        bits = np.concatenate([x < 0, level_bits.ravel().astype(bool)])
        return norms32.tobytes() + np.packbits(bits).tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        payload = self._checked(payload)
        count = len(self.segments)
        norms = np.frombuffer(payload, dtype="<f4", count=count).astype(np.float64)
        packed = np.frombuffer(payload, dtype=np.uint8, offset=4 * count)
        bits = np.unpackbits(packed, count=self.size * (1 + self.bits))
        levels = bits[self.size:].reshape(self.size, self.bits) @ self.place_values
        magnitude = self._per_coordinate(norms) * levels / self.config.levels
        return np.where(bits[: self.size] == 1, -magnitude, magnitude).astype(np.float32)


class _Sparse(_Segmented):
    """A sparsifier sending k of the d coordinates; an update with a non-finite value is sent as k NaNs."""

    def __init__(self, config: _SparseConfig, segments: Sequence[int]) -> None:
        super().__init__(config, segments)
        if self.size > 2**32:
            raise ValueError(f"{config.name} sends uint32 indices; d={self.size} is too large")
        self.k = config.kept(self.size)

    def _values(self, update: np.ndarray, indices: np.ndarray, gain: float) -> np.ndarray:
        if not np.isfinite(update).all():
            return np.full(self.k, np.nan, dtype="<f4")
        return (update[indices].astype(np.float64) * gain).astype("<f4")


@CODECS.register("topk", TopKConfig)
class TopK(_Sparse):
    """Top-k sparsification (Aji & Heafield, EMNLP 2017; Stich et al., NeurIPS 2018), 8k bytes.

        x̂_i = x_i for the k coordinates of largest |x_i|, 0 elsewhere

    so ‖x − x̂‖² ≤ (1 − k/d)·‖x‖² (a k/d-contraction); k = d is lossless. k is
    fixed or max(1, ⌊fraction·d + ½⌋), over the whole vector. Payload: the k
    indices ascending as uint32, then their values as float32.
    """

    @property
    def payload_bytes(self) -> int:
        return 8 * self.k

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        x = self._flat(update)
        indices = np.sort(np.argpartition(-np.abs(x), self.k - 1)[: self.k])
        return indices.astype("<u4").tobytes() + self._values(x, indices, 1.0).tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        payload = self._checked(payload)
        indices = np.frombuffer(payload, dtype="<u4", count=self.k)
        decoded = np.zeros(self.size, dtype=np.float32)
        decoded[indices] = np.frombuffer(payload, dtype="<f4", offset=4 * self.k)
        return decoded


@CODECS.register("randk", RandKConfig)
class RandK(_Sparse):
    """Unbiased random-k sparsification (Stich et al., NeurIPS 2018; Wangni et al., NeurIPS 2018), 8 + 4k bytes.

        x̂_i = (d/k)·x_i for k coordinates drawn uniformly without replacement, 0 elsewhere

    so E[x̂] = x. Rather than indices the payload carries the seed they are drawn
    from (one uint64 taken from ``rng``; both ends draw them with
    ``np.random.default_rng(seed).choice(d, k, replace=False)``), then the k
    scaled values as float32 in the order drawn.
    """

    @property
    def payload_bytes(self) -> int:
        return 8 + 4 * self.k

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        x = self._flat(update)
        seed = rng.integers(2**63, dtype=np.uint64)
        values = self._values(x, self._indices(seed), self.size / self.k)
        return np.array([seed], dtype="<u8").tobytes() + values.tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        payload = self._checked(payload)
        seed = np.frombuffer(payload, dtype="<u8", count=1)[0]
        decoded = np.zeros(self.size, dtype=np.float32)
        decoded[self._indices(seed)] = np.frombuffer(payload, dtype="<f4", offset=8)
        return decoded

    def _indices(self, seed: np.uint64) -> np.ndarray:
        return np.random.default_rng(int(seed)).choice(self.size, self.k, replace=False)


@CODECS.register("sign", SignConfig)
class ScaledSign(_Segmented):
    """Scaled sign, the compressor of EF-SignSGD (Karimireddy et al., ICML 2019, "Error Feedback Fixes SignSGD").

        x̂_i = (‖x‖₁/n) · sign(x_i)   per segment of n coordinates, sign(0) = +1

    Payload: S scales as float32, then d sign bits packed MSB first (1 = x_i ≥ 0):
    4S + ⌈d/8⌉ bytes. Biased; pair it with :class:`ErrorFeedback`.
    """

    @property
    def payload_bytes(self) -> int:
        return 4 * len(self.segments) + -(-self.size // 8)

    def encode(self, update: np.ndarray, rng: np.random.Generator) -> bytes:
        x = self._flat(update)
        scales = np.add.reduceat(np.abs(x).astype(np.float64), self.starts) / np.asarray(self.segments)
        return scales.astype("<f4").tobytes() + np.packbits(x >= 0).tobytes()

    def decode(self, payload: bytes) -> np.ndarray:
        payload = self._checked(payload)
        count = len(self.segments)
        scales = self._per_coordinate(np.frombuffer(payload, dtype="<f4", count=count))
        positive = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, offset=4 * count), count=self.size) == 1
        return np.where(positive, scales, -scales).astype(np.float32)


# --------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Error feedback around any codec, one residual per key (sensor id).

        p_t = encode(Δ_t + e_{t−1}),   e_t = Δ_t + e_{t−1} − decode(p_t),   e_0 = 0

    (Seide et al., Interspeech 2014, "1-Bit SGD"; Karimireddy et al., ICML 2019),
    so Σ_t decode(p_t) + e_T = Σ_t Δ_t: nothing a lossy codec drops is lost, only
    delayed. If Δ_t + e_{t−1} is not finite the residual restarts at zero: that
    payload is rejected as non-finite, and a NaN residual would spoil every later
    one. Stored residuals are read-only float32 arrays, shared rather than copied.
    """

    def __init__(self, codec: Codec, size: int) -> None:
        self.codec = codec
        self.size = size
        self._residuals: dict[int, np.ndarray] = {}

    def send(self, key: int, update: np.ndarray, rng: np.random.Generator) -> bytes:
        """The payload for ``update`` plus ``key``'s residual; the residual becomes what this payload leaves out."""
        corrected = np.asarray(update, dtype=np.float32) + self.residual(key)
        payload = self.codec.encode(corrected, rng)
        residual = corrected - self.codec.decode(payload)
        if np.isfinite(residual).all():
            residual.flags.writeable = False
            self._residuals[int(key)] = residual
        else:
            self._residuals.pop(int(key), None)
        return payload

    def residual(self, key: int) -> np.ndarray:
        """``key``'s residual e, float32 (d,); zeros for a key not yet seen."""
        residual = self._residuals.get(int(key))
        return np.zeros(self.size, dtype=np.float32) if residual is None else residual

    def state(self) -> dict[int, np.ndarray]:
        """Every stored residual by key, for a checkpoint; keys never sent to are absent (zero)."""
        return dict(self._residuals)

    def load(self, state: dict[int, np.ndarray]) -> None:
        """Replace every residual with those of ``state`` (as :meth:`state` returns)."""
        residuals = {}
        for key, value in state.items():
            residual = np.array(value, dtype=np.float32)
            if residual.shape != (self.size,):
                raise ValueError(f"residual of key {key} has shape {residual.shape}, expected ({self.size},)")
            residual.flags.writeable = False
            residuals[int(key)] = residual
        self._residuals = residuals

"""A sensor's own preprocessing of its windows: smoothing, then z-scoring.

Pure numpy. A client actor applies :func:`apply` to each sensor's data after
loading it; the coordinator applies it to each held-out test sensor. Statistics
come from the sensor's own samples only, as a real device would compute them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from raysim.scenario import Preprocess

_MIN_STD = 1e-6  # below this a channel is treated as constant: centred, not scaled


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of length ``window`` along the last (time) axis.

        y_t = mean(x_s : t - ⌊(w-1)/2⌋ ≤ s ≤ t + ⌊w/2⌋, 0 ≤ s < T)

    The output has the input's shape and dtype; near the edges the average is
    over the samples that exist. ``window`` 1 returns a copy of ``x``.
    """
    if window < 1:
        raise ValueError(f"smoothing window must be at least 1, got {window}")
    x = np.asarray(x)
    if window == 1 or x.shape[-1] == 0:
        return x.copy()
    length = x.shape[-1]
    left, right = (window - 1) // 2, window // 2
    csum = np.zeros(x.shape[:-1] + (length + 1,), dtype=np.float64)
    np.cumsum(x, axis=-1, dtype=np.float64, out=csum[..., 1:])
    t = np.arange(length)
    lo = np.maximum(t - left, 0)
    hi = np.minimum(t + right + 1, length)
    out = (csum[..., hi] - csum[..., lo]) / (hi - lo)
    return out.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32, copy=False)


def zscore(x: np.ndarray) -> np.ndarray:
    """Per-channel z-score of one sensor's windows ``x`` (n, channels, window).

        z[:, c, :] = (x[:, c, :] - μ_c) / σ_c,   μ_c, σ_c over all n·window values of channel c

    A channel with σ_c below 1e-6 is only centred. Returns float32.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"zscore expects (samples, channels, window), got shape {x.shape}")
    if x.shape[0] == 0:
        return x.astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    std = x64.std(axis=(0, 2), keepdims=True)
    std = np.where(std < _MIN_STD, 1.0, std)
    return ((x64 - mean) / std).astype(np.float32)


def apply(x: np.ndarray, cfg: "Preprocess") -> np.ndarray:
    """One sensor's preprocessing: :func:`smooth` (if smoothing_window > 1), then :func:`zscore` (if enabled)."""
    out = np.asarray(x, dtype=np.float32)
    if cfg.smoothing_window > 1:
        out = smooth(out, cfg.smoothing_window)
    if cfg.zscore:
        out = zscore(out)
    return out

"""Byzantine-robust aggregation: pure kernels over stacked updates, and a registry.

Every kernel takes ``updates`` of shape ``(n, d)`` (one flat update per row),
computes in float64 and returns the input's float dtype. Bad input — no rows,
a non-2-D array, non-finite values, parameters the rule cannot honour — is an
:class:`~raysim.errors.AggregationError`, never a silent NaN.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt

from raysim.errors import AggregationError
from raysim.registry import PluginConfig, Registry


def _checked(updates: np.ndarray, kernel: str) -> tuple[np.ndarray, np.dtype]:
    """``updates`` in float64 and the dtype to return, or AggregationError naming ``kernel``."""
    updates = np.asarray(updates)
    if updates.ndim != 2:
        raise AggregationError(f"{kernel} needs updates of shape (n, d), got shape {updates.shape}")
    if updates.shape[0] == 0:
        raise AggregationError(f"{kernel} needs at least one update, got none")
    finite_rows = np.isfinite(updates).all(axis=1)
    if not finite_rows.all():
        bad = np.flatnonzero(~finite_rows)
        raise AggregationError(
            f"{kernel} got non-finite values in {bad.size} of {updates.shape[0]} updates (rows {bad[:10].tolist()}); "
            "the coordinator must drop non-finite updates before aggregation"
        )
    return updates.astype(np.float64, copy=False), np.result_type(updates.dtype, np.float32)


def _bounded_mean(values: np.ndarray) -> np.ndarray:
    """Column means of ``values``, kept inside each column's range (float64 rounding can overshoot it by an ulp)."""
    return np.clip(values.mean(axis=0), values.min(axis=0), values.max(axis=0))


def _squared_distances(values: np.ndarray) -> np.ndarray:
    """‖u_i − u_j‖² for every pair of rows via the Gram matrix, with +inf on the diagonal."""
    sq_norms = np.einsum("ij,ij->i", values, values)
    distances = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (values @ values.T)
    np.maximum(distances, 0.0, out=distances)  # cancellation can leave tiny negatives
    np.fill_diagonal(distances, np.inf)
    return distances


def _krum_scores(distances: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Krum score of each row of a pool: the sum of its n−f−2 smallest distances to the others.

    Bulyan's shrinking pool can fall below n = 2f + 3; there the count is kept
    at one neighbour (and none for a pool of one) so every pick stays defined.
    """
    pool = distances.shape[0]
    neighbours = min(max(pool - num_byzantine - 2, 1), pool - 1)
    return np.sort(distances, axis=1)[:, :neighbours].sum(axis=1)


def row_norms(updates: np.ndarray) -> np.ndarray:
    """L2 norm ‖u_i‖₂ of each row, in float64."""
    return np.linalg.norm(np.asarray(updates, dtype=np.float64), axis=1)


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning").

        g_k = median_i u_{i,k}   for every coordinate k

    With an even n the median of a coordinate is the mean of its two middle values.
    """
    values, dtype = _checked(updates, "coordinate_median")
    return np.median(values, axis=0).astype(dtype)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning").

        g_k = 1/(n − 2b) · Σ_{i=b+1}^{n−b} u_{(i),k},   b = ⌊β·n⌋

    u_{(i),k} is the i-th smallest value of coordinate k; β = 0 is the plain mean.
    0 ≤ β < 0.5 keeps at least one value per coordinate.
    """
    values, dtype = _checked(updates, "trimmed_mean")
    n = values.shape[0]
    if not 0.0 <= beta < 0.5:
        raise AggregationError(f"trimmed_mean needs 0 <= beta < 0.5, got beta={beta} for n={n} updates")
    trim = int(np.floor(beta * n))
    kept = np.sort(values, axis=0)[trim : n - trim]
    return _bounded_mean(kept).astype(dtype)


def krum_select(updates: np.ndarray, num_byzantine: int, num_selected: int) -> np.ndarray:
    """Indices of the ``num_selected`` rows with the lowest Krum scores, best first (Blanchard et al., NeurIPS 2017).

        s(i) = Σ_{j ∈ N_i} ‖u_i − u_j‖²,   N_i = the n − f − 2 rows nearest to u_i (i excluded)

    Requires n > 2f + 2 and 1 ≤ num_selected ≤ n. Equal scores go to the lower index.
    """
    values, _ = _checked(updates, "krum")
    return _krum_select(values, num_byzantine, num_selected)


def _krum_select(values: np.ndarray, num_byzantine: int, num_selected: int) -> np.ndarray:
    n = values.shape[0]
    if num_byzantine < 0:
        raise AggregationError(f"krum needs num_byzantine >= 0, got {num_byzantine}")
    if n <= 2 * num_byzantine + 2:
        raise AggregationError(f"Krum needs n > 2f + 2, got n={n}, f={num_byzantine}")
    if not 1 <= num_selected <= n:
        raise AggregationError(f"krum needs 1 <= num_selected <= n, got num_selected={num_selected}, n={n}")
    scores = _krum_scores(_squared_distances(values), num_byzantine)
    return np.argsort(scores, kind="stable")[:num_selected]


def krum(updates: np.ndarray, num_byzantine: int, num_selected: int = 1) -> np.ndarray:
    """Krum and Multi-Krum (Blanchard et al., NeurIPS 2017, "Machine Learning with Adversaries").

        g = (1/m) · Σ_{i ∈ M} u_i,   M = the m rows with the lowest Krum scores (see :func:`krum_select`)

    m = 1 is Krum and returns one of its inputs exactly; m > 1 is Multi-Krum.
    """
    values, dtype = _checked(updates, "krum")
    return _bounded_mean(values[_krum_select(values, num_byzantine, num_selected)]).astype(dtype)


def bulyan(updates: np.ndarray, num_byzantine: int) -> np.ndarray:
    """Bulyan over Krum (El Mhamdi et al., ICML 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium").

        1. θ = n − 2f times: move the Krum winner of the remaining pool into S.
        2. g_k = mean of the β = θ − 2f values of coordinate k in S closest to median_{i ∈ S} u_{i,k}.

    Requires n ≥ 4f + 3, so β ≥ 3. The last picks come from pools smaller than
    Krum's 2f + 3 and score by max(pool − f − 2, 1) neighbours. Ties go to the
    lower index in step 1 and to the smaller value in step 2.
    """
    values, dtype = _checked(updates, "bulyan")
    n = values.shape[0]
    if num_byzantine < 0:
        raise AggregationError(f"bulyan needs num_byzantine >= 0, got {num_byzantine}")
    if n < 4 * num_byzantine + 3:
        raise AggregationError(f"Bulyan needs n >= 4f + 3, got n={n}, f={num_byzantine}")
    distances = _squared_distances(values)
    pool = np.arange(n)
    selected: list[int] = []
    for _ in range(n - 2 * num_byzantine):
        best = int(np.argmin(_krum_scores(distances[np.ix_(pool, pool)], num_byzantine)))
        selected.append(int(pool[best]))
        pool = np.delete(pool, best)
    # Sorting each column first makes the tie-break (smaller value) and the summation order independent of row order.
    chosen = np.sort(values[selected], axis=0)
    beta = len(selected) - 2 * num_byzantine
    median = np.median(chosen, axis=0)
    closest = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:beta]
    return _bounded_mean(np.take_along_axis(chosen, closest, axis=0)).astype(dtype)


def norm_clip(updates: np.ndarray, max_norm: float) -> np.ndarray:
    """Per-update L2 norm clipping (Sun et al. 2019, "Can You Really Backdoor Federated Learning?").

        u_i ← u_i · min(1, C / ‖u_i‖₂)

    Rows with ‖u_i‖₂ ≤ C are returned bit for bit; clipped rows keep their direction.
    """
    values, dtype = _checked(updates, "norm_clip")
    if not max_norm > 0:
        raise AggregationError(f"norm_clip needs max_norm > 0, got {max_norm}")
    norms = row_norms(values)
    over = norms > max_norm
    clipped = np.array(updates, dtype=dtype)
    clipped[over] = values[over] * (max_norm / norms[over])[:, None]
    return clipped


class Aggregator(Protocol):
    """Combines one round's updates (n, d) into a single update (d,)."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The aggregated update; ``weights`` (n,) are the sample counts, which robust rules ignore."""
        ...

    def min_updates(self) -> int:
        """The smallest number of updates the rule's math allows."""
        ...


AGGREGATORS: Registry[Aggregator] = Registry("aggregation.aggregator")


class MeanConfig(PluginConfig):
    name: Literal["mean"] = "mean"


class MedianConfig(PluginConfig):
    name: Literal["median"] = "median"


class TrimmedMeanConfig(PluginConfig):
    name: Literal["trimmed_mean"] = "trimmed_mean"
    beta: float = Field(0.1, ge=0, lt=0.5)  # β: fraction of values dropped from each end of every coordinate


class KrumConfig(PluginConfig):
    name: Literal["krum"] = "krum"
    num_byzantine: NonNegativeInt  # f: Byzantine updates tolerated
    num_selected: PositiveInt = 1  # m: best-scored updates averaged; m > 1 is Multi-Krum


class BulyanConfig(PluginConfig):
    name: Literal["bulyan"] = "bulyan"
    num_byzantine: NonNegativeInt  # f: Byzantine updates tolerated


class _Configured:
    """An aggregator built from its config; it needs one update unless it says otherwise."""

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def min_updates(self) -> int:
        return 1


class Mean(_Configured):
    """Sample-weighted mean Σ_i w_i·u_i / Σ_i w_i (McMahan et al., AISTATS 2017): the non-robust baseline."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # Imported here: raysim.strategies imports this module at its end.
        from raysim.strategies import weighted_mean

        return weighted_mean(updates, weights)


class Median(_Configured):
    """Coordinate-wise median (Yin et al., ICML 2018); every update counts once, whatever its weight."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return coordinate_median(updates)


class TrimmedMean(_Configured):
    """Coordinate-wise β-trimmed mean (Yin et al., ICML 2018); every update counts once, whatever its weight."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return trimmed_mean(updates, self.config.beta)


class Krum(_Configured):
    """Krum, or Multi-Krum with m > 1 (Blanchard et al., NeurIPS 2017); needs n ≥ max(2f + 3, m)."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return krum(updates, self.config.num_byzantine, self.config.num_selected)

    def min_updates(self) -> int:
        return max(2 * self.config.num_byzantine + 3, self.config.num_selected)


class Bulyan(_Configured):
    """Bulyan over Krum (El Mhamdi et al., ICML 2018); needs n ≥ 4f + 3."""

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return bulyan(updates, self.config.num_byzantine)

    def min_updates(self) -> int:
        return 4 * self.config.num_byzantine + 3


AGGREGATORS.register("mean", MeanConfig)(Mean)
AGGREGATORS.register("median", MedianConfig)(Median)
AGGREGATORS.register("trimmed_mean", TrimmedMeanConfig)(TrimmedMean)
AGGREGATORS.register("krum", KrumConfig)(Krum)
AGGREGATORS.register("bulyan", BulyanConfig)(Bulyan)

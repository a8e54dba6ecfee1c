"""Update validation: which received updates a server step may aggregate, and why the others are rejected.

Always on: an update with a NaN or infinite value is rejected as
``non_finite``; an update whose base-model fingerprint is not the one the
coordinator recorded for the version it claims to have trained from is
rejected as ``unknown_base``. Optional anomaly filters compare each finite
update with the rest of its step (they need at least three):

- ``norm_zscore: z`` rejects updates whose L2 norm is more than z standard
  deviations above the mean norm (``norm_outlier``);
- ``min_cosine: c`` rejects updates whose cosine similarity to the mean of
  the other updates is below c (``cosine_outlier``).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

ACCEPTED, NON_FINITE, UNKNOWN_BASE, NORM_OUTLIER, COSINE_OUTLIER = (
    "", "non_finite", "unknown_base", "norm_outlier", "cosine_outlier")
_MIN_FOR_FILTERS = 3


class Validation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    norm_zscore: Optional[PositiveFloat] = None  # reject norms this many standard deviations above the mean
    min_cosine: Optional[float] = Field(None, ge=-1.0, le=1.0)  # reject updates this dissimilar to the others

    @property
    def filters(self) -> bool:
        return self.norm_zscore is not None or self.min_cosine is not None


def fingerprint(weights: np.ndarray) -> int:
    """A 63-bit digest of a weight vector's bytes: what an update says it trained from."""
    digest = hashlib.blake2b(np.ascontiguousarray(weights).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def screen(deltas: np.ndarray, base_known: np.ndarray, config: Validation) -> np.ndarray:
    """Each update's rejection reason (``ACCEPTED`` = "" if it may be aggregated), as a string array.

    ``base_known[i]`` says whether update i's base fingerprint matched the
    version it claims. Checks apply in order; an update gets the first reason that fits.
    """
    count = len(deltas)
    reasons = np.full(count, ACCEPTED, dtype=object)
    finite = np.isfinite(deltas).all(axis=1) if count else np.zeros(0, bool)
    reasons[~finite] = NON_FINITE
    reasons[finite & ~np.asarray(base_known, dtype=bool)] = UNKNOWN_BASE
    candidates = np.flatnonzero(reasons == ACCEPTED)
    if len(candidates) >= _MIN_FOR_FILTERS and config.filters:
        rows = deltas[candidates].astype(np.float64)
        norms = np.linalg.norm(rows, axis=1)
        if config.norm_zscore is not None and norms.std() > 0:
            z = (norms - norms.mean()) / norms.std()
            reasons[candidates[z > config.norm_zscore]] = NORM_OUTLIER
        if config.min_cosine is not None:
            others = (rows.sum(axis=0) - rows) / (len(rows) - 1)  # leave-one-out mean
            denominator = norms * np.linalg.norm(others, axis=1)
            cosine = np.where(denominator > 0, (rows * others).sum(axis=1) / np.where(denominator > 0, denominator, 1), 1)
            low = candidates[(cosine < config.min_cosine) & (reasons[candidates] == ACCEPTED)]
            reasons[low] = COSINE_OUTLIER
    return reasons.astype(str)

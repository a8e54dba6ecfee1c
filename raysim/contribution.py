"""Per-sensor contribution scores, and trust-weighted aggregation.

After a synchronous round's updates pass validation, each update u_i (with its
aggregation weight a_i) is scored against the value of a set S of updates,

    v(S) = −L_val(w + Σ_{i∈S} a_i u_i / Σ_{i∈S} a_i),   v(∅) = −L_val(w),

L_val the mean cross-entropy on a held-out validation set (never the test
set) and w the round's global model. Methods (``contribution.method``):

- ``loo``: leave-one-out, c_i = v(N) − v(N \\ {i}): n + 1 validation passes.
- ``shapley``: Monte-Carlo Shapley (Ghorbani & Zou, ICML 2019), the mean
  marginal value v(P ∪ {i}) − v(P) of i over ``permutations`` random orders;
  permutations × n validation passes. Each order's marginals add up to
  v(N) − v(∅) exactly.
- ``loss``: the update on its own, c_i = v({i}) − v(∅): n passes.
- ``cosine``: cos(u_i, mean of the updates): no validation pass at all.

The exact methods run for rounds of at most ``max_exact`` valid updates;
larger rounds use ``fallback`` (cosine or loss). A validation pass is one
batched forward of ``validation_samples`` windows; passes run 256 models at a
time. With ``trust``, every scored sensor's trust τ_i ← d·τ_i + (1 − d)·h_i
(τ starts at 1, d = ``trust_decay``), h_i = [c_i > 0] for the value-based
methods and [c_i ≥ the round's median] for cosine, and the round's
aggregation weights are multiplied by τ_i, the current round's scores included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch.nn import functional as F

from raysim.architectures import stacked_forward

if TYPE_CHECKING:
    from torch import nn

    from raysim.models import ParamLayout

_CHUNK = 256  # models evaluated in one batched forward

# contributions.parquet: one row per scored update.
CONTRIBUTIONS_SCHEMA = pa.schema([("round", pa.int64()), ("sensor", pa.int64()), ("score", pa.float64()),
                                  ("method", pa.string())])


class ContributionScorer:
    """Scores each round's updates on a validation set and keeps every sensor's trust."""

    def __init__(self, config: Any, model: "nn.Module", layout: "ParamLayout", x: np.ndarray, y: np.ndarray,
                 fleet_size: int, seed: int) -> None:
        self.config = config
        self.model, self.layout = model, layout
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.trust = np.ones(fleet_size)
        self.seed = seed
        self.rows: list[dict[str, Any]] = []  # contributions.parquet: round, sensor, score, method

    def method_for(self, count: int) -> str:
        method = self.config.method
        if method in ("loo", "shapley") and count > self.config.max_exact:
            return self.config.fallback
        return method

    @torch.no_grad()
    def values(self, models: np.ndarray) -> np.ndarray:
        """v of each flat model (M, d): minus its mean validation cross-entropy."""
        out = np.empty(len(models))
        for start in range(0, len(models), _CHUNK):
            chunk = torch.from_numpy(np.ascontiguousarray(models[start : start + _CHUNK], dtype=np.float32))
            x = self.x.expand(len(chunk), *self.x.shape)
            logits = stacked_forward(self.model, self.layout.split(chunk), x)
            loss = F.cross_entropy(logits.flatten(0, 1), self.y.repeat(len(chunk)), reduction="none")
            out[start : start + len(chunk)] = -loss.view(len(chunk), -1).mean(1).double().numpy()
        return out

    def score(self, weights: np.ndarray, updates: np.ndarray, a: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """Each update's contribution, and the method used (see the module docstring)."""
        updates = np.asarray(updates, dtype=np.float64)
        a = np.asarray(a, dtype=np.float64)
        n = len(updates)
        method = self.method_for(n)
        if method == "cosine":
            mean = (a @ updates) / a.sum()
            norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(mean)
            return np.where(norms > 0, updates @ mean / np.maximum(norms, 1e-30), 0.0), method
        base = weights.astype(np.float64)
        if method == "loss":
            values = self.values(np.vstack([base, base + updates]))
            return values[1:] - values[0], method
        total, weight = a @ updates, a.sum()
        if method == "loo":
            without = (total[None, :] - a[:, None] * updates) / np.maximum(weight - a, 1e-30)[:, None]
            without[weight - a <= 0] = 0.0  # leaving out the only update leaves the model as it was
            values = self.values(np.vstack([base + total / weight, base + without]))
            return values[0] - values[1:], method
        # Monte-Carlo Shapley: along each random order, the value of every prefix.
        scores = np.zeros(n)
        empty = self.values(base[None, :])[0]
        for _ in range(self.config.permutations):
            order = rng.permutation(n)
            sums = np.cumsum(a[order, None] * updates[order], axis=0)
            prefixes = base + sums / np.cumsum(a[order])[:, None]
            values = np.concatenate([[empty], self.values(prefixes)])
            scores[order] += np.diff(values)
        return scores / self.config.permutations, method

    def record(self, round_index: int, positions: np.ndarray, sensor_ids: np.ndarray, scores: np.ndarray,
               method: str) -> None:
        """Keep the round's scores; with trust, move each scored sensor's trust toward [score > 0]."""
        for sid, s in zip(sensor_ids.tolist(), scores.tolist()):
            self.rows.append({"round": int(round_index), "sensor": int(sid), "score": float(s), "method": method})
        if self.config.trust:
            d = self.config.trust_decay
            # A value-based score says whether the update helped; a cosine only how well it agrees with the
            # others, so it counts as helpful when at least the round's median.
            helped = scores >= np.median(scores) if method == "cosine" else scores > 0
            self.trust[positions] = d * self.trust[positions] + (1 - d) * helped

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"trust": self.trust}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.trust = np.array(state["trust"], dtype=np.float64)


def contribution_summary(rows: list[dict[str, Any]], config: Any, count: int = 10) -> dict[str, Any]:
    """summary.json's contribution entry: the method and the ``count`` highest and lowest mean scores, with
    how many rounds each sensor was scored in."""
    if not rows:
        return {"method": config.method, "scored_updates": 0, "top": [], "bottom": []}
    table = pa.Table.from_pylist(rows, schema=CONTRIBUTIONS_SCHEMA)
    grouped = table.group_by("sensor").aggregate([("score", "mean"), ("score", "count")])
    sensors = grouped["sensor"].to_numpy()
    means, counts = grouped["score_mean"].to_numpy(), grouped["score_count"].to_numpy()
    order = np.lexsort((sensors, -means))
    entry = [{"sensor": int(sensors[i]), "mean_score": float(means[i]), "rounds": int(counts[i])} for i in order]
    return {"method": config.method, "trust": bool(config.trust), "scored_updates": len(rows),
            "top": entry[:count], "bottom": entry[::-1][:count]}

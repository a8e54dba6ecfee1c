"""Client selection: which online sensors a synchronous round trains, and participation fairness.

``aggregation.selection.policy`` picks the rule; every rule chooses among the
sensors online at the round's start and draws only from the round's cohort
stream, so a run is reproducible whatever the client actors.

- ``uniform``: a uniformly random subset (the default).
- ``stratified``: each tier gets a fixed share of the cohort (its ``shares``
  entry, by default its share of the fleet), rounded by largest remainder, and
  its sensors are drawn uniformly from its online ones. A tier with too few
  online sensors gives all it has and the rest of its quota goes to the other
  tiers, uniformly.
- ``availability``: only sensors predicted to stay online for the whole task
  (download, compute, upload at their expected, loss-free durations) are
  candidates, chosen uniformly; the others are chosen only when too few
  qualify. ``predictor: model`` predicts from each tier's availability model
  without looking ahead (an on/off sensor stays on for d seconds with
  probability exp(−d / mean_on_s), kept when that is at least
  ``min_probability``; a trace is a known schedule); ``predictor: oracle``
  asks the simulated future itself, an upper bound on any predictor.
- ``oort``: utility-based selection after Oort (Lai et al., OSDI 2021). A
  sensor's statistical utility is n_i · L_i, its sample count times its last
  reported training loss, plus an uncertainty bonus √(0.1 · ln r / r_i) for
  the rounds since it last trained (r_i); sensors slower than the preferred
  duration T (expected task time t_i > T) are penalized by (T / t_i)^α. A
  share ``exploration`` of the cohort goes to sensors never tried, uniformly;
  the rest to the highest utilities.

Participation fairness is Jain's index over every sensor's selection count,
(Σ x_i)² / (N · Σ x_i²): 1 when every sensor has been selected equally often.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from raysim.clock import transfer_seconds
from raysim.fleet.profiles import tier_counts

if TYPE_CHECKING:
    from raysim.availability import Availability
    from raysim.fleet.profiles import FleetProfiles
    from raysim.scenario import Scenario


def jain_index(counts: np.ndarray) -> float:
    """Jain's fairness index (Σx)² / (N·Σx²) of non-negative counts; 1 for equal counts, 1/N for one non-zero.
    NaN when every count is 0 (nothing to compare yet)."""
    x = np.asarray(counts, dtype=np.float64)
    total = float((x * x).sum())
    return float(x.sum() ** 2 / (len(x) * total)) if total > 0 else float("nan")


def quotas(shares: np.ndarray, cohort: int) -> np.ndarray:
    """Sensors per tier of a cohort: shares × cohort by largest remainder, summing to ``cohort``."""
    return tier_counts(list(shares), cohort)


class Selector:
    """The scenario's selection policy, with the state it keeps across rounds (participation, Oort's losses)."""

    def __init__(self, scenario: "Scenario", profiles: "FleetProfiles", availability: "Availability",
                 expected_duration_s: np.ndarray) -> None:
        self.config = scenario.aggregation.selection
        self.profiles = profiles
        self.availability = availability
        self.expected_duration_s = expected_duration_s  # per fleet position: loss-free download + compute + upload
        tiers = scenario.fleet.tiers
        self.tier_names = [t.name for t in tiers]
        shares = self.config.shares or {}
        self.shares = np.array([shares.get(t.name, t.share) for t in tiers], dtype=np.float64)
        self.trace_tier = np.array([t.availability.kind == "trace" for t in tiers])
        self.mean_on_s = np.array([t.availability.mean_on_s if t.availability.kind == "onoff" else math.inf
                                   for t in tiers])[profiles.tier]
        self.selected = np.zeros(len(profiles), dtype=np.int64)  # times each sensor was selected
        self.loss = np.full(len(profiles), np.nan)  # Oort: each sensor's last reported training loss
        self.last_round = np.zeros(len(profiles), dtype=np.int64)  # Oort: the last round it trained in
        preferred = self.config.preferred_duration_s
        self.preferred_s = float(np.median(expected_duration_s)) if preferred is None else float(preferred)

    # ------------------------------------------------------------------ choosing

    def choose(self, online: np.ndarray, count: int, start: float, round_index: int,
               rng: np.random.Generator) -> np.ndarray:
        """``count`` sensors (or every online one, if fewer) among the ``online`` positions, sorted."""
        count = min(count, len(online))
        policy = self.config.policy
        if policy == "stratified":
            chosen = self._stratified(online, count, rng)
        elif policy == "availability":
            chosen = self.available(online, count, start, rng)
        elif policy == "oort":
            chosen = self._oort(online, count, round_index, rng)
        else:
            chosen = rng.choice(online, count, replace=False)
        chosen = np.sort(chosen)
        self.selected[chosen] += 1
        return chosen

    def _stratified(self, online: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        tier = self.profiles.tier[online]
        want = quotas(self.shares, count)
        picked, rest = [], []
        for t, quota in enumerate(want):
            mine = online[tier == t]
            take = rng.permutation(mine)
            picked.append(take[:quota])
            rest.append(take[quota:])
        chosen = np.concatenate(picked)
        short = count - len(chosen)
        if short > 0:  # a tier without enough online sensors: the others fill its places
            spare = np.concatenate(rest)
            chosen = np.concatenate([chosen, rng.choice(spare, short, replace=False)])
        return chosen

    def stays_online(self, positions: np.ndarray, start: float) -> np.ndarray:
        """Whether each sensor is predicted to stay online for its whole task starting at ``start``."""
        duration = self.expected_duration_s[positions]
        if self.config.predictor == "oracle":
            return np.isinf(self.availability.first_offline(positions, start, start + duration))
        # The on/off process is memoryless: an online sensor stays on for d seconds with probability
        # exp(−d / mean_on_s). A trace is a schedule the sensor knows, so it is asked directly.
        keep = np.exp(-duration / self.mean_on_s[positions]) >= self.config.min_probability
        trace = self.trace_tier[self.profiles.tier[positions]]
        if trace.any():
            ahead = self.availability.first_offline(positions[trace], start, start + duration[trace])
            keep[trace] = np.isinf(ahead)
        return keep

    def fits(self, position: int, start: float) -> bool:
        """Whether one sensor may be dispatched at ``start`` (async): always, unless the policy is
        availability-aware and it is predicted to go offline during its task."""
        if self.config.policy != "availability":
            return True
        return bool(self.stays_online(np.array([position]), start)[0])

    def available(self, online: np.ndarray, count: int, start: float, rng: np.random.Generator) -> np.ndarray:
        """``count`` of the ``online`` sensors, uniformly among those predicted to stay online for their task
        (the others only when too few are), unsorted and not counted as selected."""
        good = self.stays_online(online, start)
        likely, unlikely = online[good], online[~good]
        if len(likely) >= count:
            return rng.choice(likely, count, replace=False)
        return np.concatenate([likely, rng.choice(unlikely, count - len(likely), replace=False)])

    def _oort(self, online: np.ndarray, count: int, round_index: int, rng: np.random.Generator) -> np.ndarray:
        tried = ~np.isnan(self.loss[online])
        explore = min(int(round(self.config.exploration * count)), int((~tried).sum()))
        exploit = min(count - explore, int(tried.sum()))
        explore = count - exploit  # too few tried sensors: explore more
        fresh = rng.permutation(online[~tried])[:explore]
        known = online[tried]
        utility = self.utility(known, round_index)
        order = np.lexsort((rng.random(len(known)), -utility))  # highest first, ties at random
        return np.concatenate([fresh, known[order[:exploit]]])

    def utility(self, positions: np.ndarray, round_index: int) -> np.ndarray:
        """Oort's utility of sensors that have trained: statistical utility plus the uncertainty bonus,
        times the penalty for being slower than the preferred duration."""
        n = self.profiles.num_samples[positions].astype(np.float64)
        statistical = n * self.loss[positions]
        since = np.maximum(self.last_round[positions], 1)
        bonus = np.sqrt(0.1 * math.log(max(round_index, 2)) / since) * np.nanmean(statistical) if len(positions) else 0.0
        slow = self.expected_duration_s[positions] > self.preferred_s
        penalty = np.where(slow, (self.preferred_s / self.expected_duration_s[positions]) ** self.config.slow_penalty, 1.0)
        return (statistical + bonus) * penalty

    # ------------------------------------------------------------------ feedback and state

    def report(self, positions: np.ndarray, train_loss: np.ndarray, round_index: int) -> None:
        """Training losses of sensors that trained in ``round_index`` (Oort's statistical utility)."""
        done = ~np.isnan(train_loss)
        self.loss[positions[done]] = train_loss[done]
        self.last_round[positions[done]] = round_index

    def figures(self, chosen: np.ndarray) -> dict[str, Any]:
        """The round's metrics: sensors selected per tier, and Jain's index over participation so far."""
        per_tier = np.bincount(self.profiles.tier[chosen], minlength=len(self.tier_names))
        return {"participation_fairness": jain_index(self.selected),
                **{f"selected.{name}": float(n) for name, n in zip(self.tier_names, per_tier)}}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"selected": self.selected, "loss": self.loss, "last_round": self.last_round}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.selected = np.array(state["selected"], dtype=np.int64)
        self.loss = np.array(state["loss"], dtype=np.float64)
        self.last_round = np.array(state["last_round"], dtype=np.int64)


def expected_durations(profiles: "FleetProfiles", bytes_down: np.ndarray, bytes_up: np.ndarray,
                       epochs: int) -> np.ndarray:
    """Each sensor's task time without losses, retries or jitter: download + compute + upload."""
    down = transfer_seconds(bytes_down, profiles.down_mbps, profiles.latency_ms)
    up = transfer_seconds(bytes_up, profiles.up_mbps, profiles.latency_ms)
    return down + profiles.num_samples * epochs * profiles.seconds_per_sample + up

"""Tier assignment and columnar fleet profiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raysim.fleet.profiles import assign_tiers, build_profiles, tier_counts
from raysim.scenario import Scenario, Tier

GATEWAY = Tier(name="gateway", share=0.2, seconds_per_sample=0.0005, up_mbps=50, down_mbps=100, latency_ms=20,
               loss=0.0, retransmit_timeout_s=0.5, max_retries=2)
IOT = Tier(name="iot", share=0.8, seconds_per_sample=0.0057, up_mbps=0.25, down_mbps=1, latency_ms=200, loss=0.02)


def _scenario(sensors: int, tiers=(GATEWAY, IOT), seed: int = 7) -> Scenario:
    return Scenario(name="t", seed=seed, fleet={"sensors": sensors, "tiers": tiers}, aggregation={"cohort": 1})


def test_counts_exact_for_exact_shares():
    assert tier_counts([0.2, 0.8], 1000).tolist() == [200, 800]
    assert tier_counts([0.25, 0.25, 0.5], 8).tolist() == [2, 2, 4]


def test_largest_remainder_rounding():
    # quotas 3.33, 3.33, 3.33 → the leftover sensor goes to the first tier on a tie
    assert tier_counts([1 / 3, 1 / 3, 1 / 3], 10).tolist() == [4, 3, 3]
    # quotas 0.5, 1.7, 7.8 → floors 0, 1, 7; remainders .5, .7, .8 take the two leftovers
    assert tier_counts([0.05, 0.17, 0.78], 10).tolist() == [0, 2, 8]


@given(shares=st.lists(st.integers(1, 100), min_size=1, max_size=8), sensors=st.integers(0, 5000))
def test_counts_sum_and_stay_within_one_of_quota(shares, sensors):
    share = np.array(shares, dtype=float) / sum(shares)
    counts = tier_counts(share, sensors)
    assert counts.sum() == sensors
    assert (np.abs(counts - share * sensors) < 1).all()


def test_assign_tiers_gives_exact_counts_and_is_seeded():
    tiers = assign_tiers((GATEWAY, IOT), 1001, seed=3)
    assert tiers.dtype == np.int16 and len(tiers) == 1001
    assert np.bincount(tiers, minlength=2).tolist() == [200, 801]
    np.testing.assert_array_equal(tiers, assign_tiers((GATEWAY, IOT), 1001, seed=3))
    assert not np.array_equal(tiers, assign_tiers((GATEWAY, IOT), 1001, seed=4))
    # a permutation, not blocks by id: gateways are spread over the id range
    gateways = np.flatnonzero(tiers == 0)
    assert gateways.min() < 100 and gateways.max() > 900


def test_build_profiles_columns_match_tier_values():
    ids = np.arange(50, dtype=np.int64) * 3 + 11
    counts = np.arange(50, dtype=np.int64) + 4
    prof = build_profiles(_scenario(50), ids, counts)
    assert len(prof) == 50
    assert prof.tier_names == ("gateway", "iot")
    np.testing.assert_array_equal(prof.sensor_id, ids)
    np.testing.assert_array_equal(prof.num_samples, counts)
    assert np.bincount(prof.tier, minlength=2).tolist() == [10, 40]
    for index, tier in enumerate((GATEWAY, IOT)):
        mine = prof.tier == index
        for column in ("seconds_per_sample", "up_mbps", "down_mbps", "latency_ms", "loss", "retransmit_timeout_s", "max_retries"):
            assert (getattr(prof, column)[mine] == getattr(tier, column)).all(), column
    assert prof.max_retries.dtype == np.int32 and prof.tier.dtype == np.int16
    assert prof.up_mbps.dtype == np.float64 and prof.sensor_id.dtype == np.int64
    assert (prof.retransmit_timeout_s[prof.tier == 1] == 1.0).all()  # Tier default
    assert (prof.max_retries[prof.tier == 1] == 3).all()


def test_take_returns_aligned_subset():
    prof = build_profiles(_scenario(20), np.arange(20) + 100, np.arange(20) * 2)
    sub = prof.take([5, 2, 19])
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.sensor_id, [105, 102, 119])
    np.testing.assert_array_equal(sub.num_samples, [10, 4, 38])
    np.testing.assert_array_equal(sub.tier, prof.tier[[5, 2, 19]])
    np.testing.assert_array_equal(sub.up_mbps, prof.up_mbps[[5, 2, 19]])
    assert sub.tier_names == prof.tier_names
    np.testing.assert_array_equal(prof.positions([119, 100]), [19, 0])
    with pytest.raises(KeyError):
        prof.positions([7])


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        build_profiles(_scenario(5), np.arange(5), np.arange(4))

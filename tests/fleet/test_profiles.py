"""Tier assignment, per-sensor profile draws and columnar fleet profiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from raysim.fleet.profiles import assign_tiers, build_profiles, tier_counts
from raysim.streams import keyed_streams
from raysim.scenario import Scenario, Tier
from raysim.streams import AVAILABILITY, PROFILE, stream

GATEWAY = Tier(name="gateway", share=0.2, seconds_per_sample=0.0005, up_mbps=50, down_mbps=100, latency_ms=20,
               loss=0.0, retransmit_timeout_s=0.5, max_retries=2)
IOT = Tier(name="iot", share=0.8, seconds_per_sample=0.0057, up_mbps=0.25, down_mbps=1, latency_ms=200, loss=0.02,
           jitter_sigma=0.3)


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
        for column in ("seconds_per_sample", "up_mbps", "down_mbps", "jitter_sigma", "latency_ms", "loss",
                       "retransmit_timeout_s", "max_retries"):
            assert (getattr(prof, column)[mine] == getattr(tier, column)).all(), column
    assert prof.max_retries.dtype == np.int32 and prof.tier.dtype == np.int16
    assert prof.up_mbps.dtype == np.float64 and prof.sensor_id.dtype == np.int64
    assert prof.jitter_sigma.dtype == np.float64
    assert (prof.jitter_sigma[prof.tier == 0] == 0.0).all()  # Tier default
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


# --------------------------------------------------------------------------- per-sensor draws


def _spread(name="spread", share=1.0, speed=0.0, bandwidth=0.0, jitter=0.0) -> Tier:
    return Tier(name=name, share=share, seconds_per_sample=0.002, up_mbps=2.0, down_mbps=8.0,
                speed_sigma=speed, bandwidth_sigma=bandwidth, jitter_sigma=jitter)


@pytest.mark.parametrize("column, median, speed, bandwidth", [
    ("seconds_per_sample", 0.002, 0.5, 0.0),
    ("up_mbps", 2.0, 0.0, 0.4),
    ("down_mbps", 8.0, 0.0, 0.4),
])
def test_drawn_values_are_lognormal_around_the_tier_median(column, median, speed, bandwidth):
    sensors = 20_000
    prof = build_profiles(_scenario(sensors, (_spread(speed=speed, bandwidth=bandwidth),)),
                          np.arange(sensors), np.full(sensors, 10))
    sigma = speed if column == "seconds_per_sample" else bandwidth
    logs = np.log(getattr(prof, column))
    # standard error of the mean is σ/√n ≈ 0.0035 and of the std ≈ σ/√(2n) ≈ 0.0025: 0.02 is > 5 of them
    assert abs(logs.mean() - np.log(median)) < 0.02
    assert abs(logs.std() - sigma) < 0.02


def test_each_sigma_spreads_only_its_own_columns():
    prof = build_profiles(_scenario(200, (_spread(speed=0.5),)), np.arange(200), np.full(200, 10))
    assert np.unique(prof.seconds_per_sample).size == 200
    assert (prof.up_mbps == 2.0).all() and (prof.down_mbps == 8.0).all()
    prof = build_profiles(_scenario(200, (_spread(bandwidth=0.5),)), np.arange(200), np.full(200, 10))
    assert (prof.seconds_per_sample == 0.002).all()
    # up and down are separate draws: their log deviations are uncorrelated
    assert abs(np.corrcoef(np.log(prof.up_mbps), np.log(prof.down_mbps))[0, 1]) < 0.3
    assert not np.allclose(np.log(prof.up_mbps / 2.0), np.log(prof.down_mbps / 8.0))


def test_a_sensors_draws_do_not_depend_on_fleet_size_or_order():
    tiers = (_spread("a", 0.5, speed=0.3, bandwidth=0.2), _spread("b", 0.5, speed=0.6, bandwidth=0.1))
    small_ids = np.arange(50) * 7 - 20  # includes negative ids
    big_ids = np.concatenate([np.arange(450) * 7 + 1000, small_ids[::-1]])  # other sensors, other order
    small = build_profiles(_scenario(50, tiers, seed=11), small_ids, np.full(50, 5))
    big = build_profiles(_scenario(500, tiers, seed=11), big_ids, np.full(500, 5))
    where = big.positions(small_ids)
    same_tier = small.tier == big.tier[where]
    assert same_tier.sum() >= 10  # enough shared sensors for the comparison to mean something
    for column in ("seconds_per_sample", "up_mbps", "down_mbps"):
        np.testing.assert_array_equal(getattr(small, column)[same_tier], getattr(big, column)[where][same_tier])


def test_changing_one_tiers_sigma_moves_no_other_sensor():
    before = build_profiles(_scenario(300, (_spread("a", 0.5, speed=0.2), _spread("b", 0.5, bandwidth=0.3))),
                            np.arange(300), np.full(300, 5))
    after = build_profiles(_scenario(300, (_spread("a", 0.5, speed=0.2), _spread("b", 0.5, bandwidth=0.6, speed=0.4))),
                           np.arange(300), np.full(300, 5))
    a = before.tier == 0
    np.testing.assert_array_equal(before.tier, after.tier)
    for column in ("seconds_per_sample", "up_mbps", "down_mbps"):
        np.testing.assert_array_equal(getattr(before, column)[a], getattr(after, column)[a])
    # in tier b the same z is scaled by the new σ: doubling σ doubles the log deviation from the median
    np.testing.assert_allclose(np.log(after.up_mbps[~a] / 2.0), 2 * np.log(before.up_mbps[~a] / 2.0), rtol=1e-9)
    assert (before.seconds_per_sample[~a] == 0.002).all() and (after.seconds_per_sample[~a] != 0.002).all()


def test_draws_are_the_sensors_own_profile_stream():
    ids = np.array([0, 5, -3, 2**40 + 1])
    prof = build_profiles(_scenario(4, (_spread(speed=0.3, bandwidth=0.2),), seed=9), ids, np.full(4, 5))
    for i, sensor in enumerate(ids):
        z = stream(9, PROFILE, int(sensor)).standard_normal(3)
        assert prof.seconds_per_sample[i] == pytest.approx(0.002 * np.exp(0.3 * z[0]), rel=1e-12)
        assert prof.up_mbps[i] == pytest.approx(2.0 * np.exp(0.2 * z[1]), rel=1e-12)
        assert prof.down_mbps[i] == pytest.approx(8.0 * np.exp(0.2 * z[2]), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**70])
def test_keyed_streams_match_stream(seed):
    ids = np.array([0, 1, 5, 2**32 - 1, 2**32, 2**40 + 3, -1, -(2**63), 2**63 - 1, 123456789], dtype=np.int64)
    for keys in (ids[:, None], np.stack([ids, np.arange(len(ids)) * 3], 1), np.stack([ids, ids[::-1]], 1)):
        got = [rng.random(4) for rng in keyed_streams(seed, AVAILABILITY, keys)]
        want = [stream(seed, AVAILABILITY, *map(int, row)).random(4) for row in keys]
        np.testing.assert_array_equal(np.array(got), np.array(want))


def test_jitter_sigma_is_copied_from_the_tier():
    prof = build_profiles(_scenario(30, (_spread(jitter=0.25),)), np.arange(30), np.full(30, 5))
    assert (prof.jitter_sigma == 0.25).all()
    assert (prof.take([3, 1]).jitter_sigma == 0.25).all()


def test_profiles_built_without_a_jitter_column_have_no_jitter():
    prof = build_profiles(_scenario(6, (_spread(jitter=0.25),)), np.arange(6), np.full(6, 5))
    names = ("sensor_id", "tier", "num_samples", "seconds_per_sample", "up_mbps", "down_mbps", "latency_ms", "loss",
             "retransmit_timeout_s", "max_retries")
    columns = {name: getattr(prof, name) for name in names}
    bare = type(prof)(**columns)
    assert bare.jitter_sigma.shape == (6,) and (bare.jitter_sigma == 0.0).all()

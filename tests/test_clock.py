"""The virtual clock: task timings from profiles, losses and retries, seeded per sensor and round."""

from __future__ import annotations

import numpy as np
import pytest

from raysim.clock import APPLIED, LOST, OFFLINE, plan_task, plan_tasks, stack_timings
from raysim.fleet.profiles import FleetProfiles


def profiles(count: int, *, loss: float = 0.0, retries: int = 3, samples: int = 50, sps: float = 0.01,
             up: float = 1.0, down: float = 4.0, latency_ms: float = 100.0, rto: float = 2.0,
             jitter: float = 0.0) -> FleetProfiles:
    def full(value, dtype=np.float64):
        return np.full(count, value, dtype=dtype)

    return FleetProfiles(
        sensor_id=np.arange(count, dtype=np.int64) * 3 + 11,
        tier=np.zeros(count, dtype=np.int16),
        num_samples=full(samples, np.int64),
        seconds_per_sample=full(sps),
        up_mbps=full(up),
        down_mbps=full(down),
        latency_ms=full(latency_ms),
        loss=full(loss),
        retransmit_timeout_s=full(rto),
        max_retries=full(retries, np.int32),
        jitter_sigma=full(jitter),
        tier_names=("only",),
    )


def plan(p: FleetProfiles, round_index: int = 1, **kw):
    args = dict(seed=5, task_keys=round_index, dispatched_at=100.0, bytes_down=250_000, bytes_up=125_000, epochs=2)
    args.update(kw)
    return plan_tasks(p, **args)


def test_lossless_times_follow_the_formulas():
    result = plan(profiles(4))
    # download: 0.1 s latency + 8·250,000 bit / 4 Mbit/s = 0.6 s; compute: 50 × 2 × 0.01 = 1 s;
    # upload: 0.1 + 8·125,000 / 1 Mbit/s = 1.1 s
    np.testing.assert_allclose(result.download_s, 0.6)
    np.testing.assert_allclose(result.compute_s, 1.0)
    np.testing.assert_allclose(result.upload_s, 1.1)
    np.testing.assert_allclose(result.arrived_at, 102.7)
    assert result.delivered.all() and (result.outcome == APPLIED).all()
    assert (result.down_attempts == 1).all() and (result.up_attempts == 1).all()


def test_certain_loss_without_retries_loses_every_task_without_training():
    result = plan(profiles(6, loss=0.999999, retries=0))
    assert not result.delivered.any() and (result.outcome == LOST).all()
    np.testing.assert_allclose(result.compute_s, 0.0)
    # One failed download attempt: its transfer time plus the retransmission timeout.
    np.testing.assert_allclose(result.download_s, 0.6 + 2.0)
    assert (result.up_attempts == 0).all()


def test_loss_rate_matches_probability():
    loss, count = 0.3, 4000
    result = plan(profiles(count, loss=loss, retries=0))
    expected = (1 - loss) ** 2  # download and upload must both succeed first time
    assert abs(result.delivered.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / count)


def test_retries_cost_timeouts_and_count_attempts():
    result = plan(profiles(3000, loss=0.5, retries=2))
    ok = result.delivered
    one_down, rto = 0.6, 2.0
    np.testing.assert_allclose(result.download_s[ok], (result.down_attempts[ok] - 1) * (one_down + rto) + one_down)
    assert result.down_attempts.max() == 3 and result.down_attempts.min() == 1
    # With 3 attempts each, a transfer fails with probability 0.5³; both must succeed.
    expected = (1 - 0.5**3) ** 2
    assert abs(ok.mean() - expected) < 0.04


def test_plan_is_seeded_per_sensor_and_round():
    p = profiles(200, loss=0.4, retries=1)
    first, again = plan(p), plan(p)
    np.testing.assert_array_equal(first.arrived_at, again.arrived_at)
    subset = np.arange(0, 200, 7)
    part = plan(p.take(subset))
    np.testing.assert_array_equal(part.arrived_at, first.arrived_at[subset])
    np.testing.assert_array_equal(part.delivered, first.delivered[subset])
    other_round = plan(p, round_index=2)
    assert not np.array_equal(other_round.arrived_at, first.arrived_at)


def test_slower_links_take_longer():
    fast = plan(profiles(1, up=10.0, down=10.0))
    slow = plan(profiles(1, up=0.25, down=1.0))
    assert slow.arrived_at[0] > fast.arrived_at[0]


@pytest.mark.parametrize("epochs", [1, 3])
def test_compute_scales_with_samples_and_epochs(epochs):
    small = plan(profiles(1, samples=10), epochs=epochs)
    large = plan(profiles(1, samples=40), epochs=epochs)
    np.testing.assert_allclose(large.compute_s, 4 * small.compute_s)
    np.testing.assert_allclose(small.compute_s, 10 * epochs * 0.01)


def test_compute_jitter_is_lognormal_around_the_median():
    result = plan(profiles(4000, jitter=0.5))
    factors = result.compute_s / 1.0  # 50 samples × 2 epochs × 0.01 s
    assert abs(np.median(factors) - 1.0) < 0.05
    assert abs(np.log(factors).std() - 0.5) < 0.03


class OnlineUntil:
    """Availability double: every sensor is online on [0, until) and offline after."""

    def __init__(self, until: float) -> None:
        self.until = until

    def first_offline(self, positions, start, end):
        start, end = np.broadcast_arrays(start, end)
        return np.where(end >= self.until, np.maximum(start, self.until), np.inf)

    def offline_within(self, position, start, end):
        return max(start, self.until) if end >= self.until else np.inf


def test_a_sensor_going_offline_mid_task_drops_it_then():
    # Lossless task: download 0.6 s, compute 1 s, upload 1.1 s; dispatched at 100 s.
    result = plan(profiles(3), availability=OnlineUntil(101.8), positions=np.arange(3))
    assert (result.outcome == OFFLINE).all() and not result.delivered.any()
    np.testing.assert_allclose(result.arrived_at, 101.8)
    np.testing.assert_allclose(result.download_s, 0.6)
    np.testing.assert_allclose(result.compute_s, 1.0)
    np.testing.assert_allclose(result.upload_s, 0.2)
    still_online = plan(profiles(3), availability=OnlineUntil(103.0), positions=np.arange(3))
    assert still_online.delivered.all()
    np.testing.assert_allclose(still_online.arrived_at, 102.7)


def test_per_task_keys_give_each_task_its_own_draws():
    p = profiles(50, loss=0.5, retries=1)
    one_key = plan(p, round_index=3)
    per_task = plan(p, round_index=np.full(50, 3))
    np.testing.assert_array_equal(one_key.arrived_at, per_task.arrived_at)
    mixed = plan(p, round_index=np.arange(50))
    assert not np.array_equal(mixed.arrived_at, one_key.arrived_at)


def test_offline_periods_from_a_real_trace(tmp_path):
    """Hand-computed: the sensor is online on [0, 101.8) and [150, 400); a 2.7 s task dispatched at 100 s
    is dropped at 101.8 s; one dispatched at 150 s arrives at 152.7 s."""
    import raysim
    from raysim.availability import Availability

    (tmp_path / "trace.csv").write_text("sensor,start_s,end_s\n11,0,101.8\n11,150,400\n")
    scenario = raysim.load_scenario({
        "name": "trace",
        "fleet": {"sensors": 1, "tiers": [{"name": "t", "share": 1, "seconds_per_sample": 0.01, "up_mbps": 1,
                                           "down_mbps": 4, "latency_ms": 100,
                                           "availability": {"kind": "trace", "path": str(tmp_path / "trace.csv")}}]},
        "aggregation": {"cohort": 1},
    })
    p = profiles(1)
    availability = Availability.from_scenario(scenario, p)
    dropped = plan(p, availability=availability, positions=np.array([0]))
    assert dropped.outcome[0] == OFFLINE and dropped.arrived_at[0] == pytest.approx(101.8)
    later = plan(p, dispatched_at=150.0, availability=availability, positions=np.array([0]))
    assert later.delivered[0] and later.arrived_at[0] == pytest.approx(152.7)


def test_one_task_plan_is_the_batch_plan_row():
    """The async loop plans one task at a time; it must get exactly the batch planner's row."""
    p = profiles(300, loss=0.3, retries=1, jitter=0.4)
    keys = np.arange(300) % 7
    availability = OnlineUntil(106.0)  # cuts tasks slowed by retries; lost downloads end by 105.2 s
    batch = plan(p, round_index=keys, availability=availability, positions=np.arange(300))
    args = dict(seed=5, dispatched_at=100.0, bytes_down=250_000, bytes_up=125_000, epochs=2, availability=availability)
    rows = stack_timings([plan_task(p, i, task_key=int(keys[i]), **args) for i in range(300)])
    assert set(batch.outcome) == {APPLIED, LOST, OFFLINE}
    for name, column in batch.__dict__.items():
        np.testing.assert_array_equal(getattr(rows, name), column, err_msg=name)

"""BandwidthLimiter and BandwidthSchedule with fake clocks."""

from __future__ import annotations

from datetime import datetime, time

import pytest

from node.primary.bandwidth import BandwidthLimiter, BandwidthSchedule, combined

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _send(limiter: BandwidthLimiter, clock: FakeClock, nbytes: int, times: int) -> None:
    """A sender that sleeps as told."""
    for _ in range(times):
        clock.now += limiter.reserve(nbytes)


def test_long_run_rate_equals_configured_rate() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(10 * MB, burst=MB, clock=clock)
    _send(limiter, clock, 65536, 10_000)
    total = 65536 * 10_000
    # the first burst goes at once, the rest at the rate
    assert clock.now == pytest.approx((total - MB) / (10 * MB), rel=1e-9)


def test_burst_after_quiet_period() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(MB, burst=4 * MB, clock=clock)
    assert limiter.reserve(4 * MB) == 0.0  # a full bucket goes at once
    assert limiter.reserve(MB) == pytest.approx(1.0)  # then the rate
    clock.now += 100.0  # quiet: the bucket refills only up to the burst
    assert limiter.reserve(4 * MB) == 0.0
    assert limiter.reserve(1) > 0.0


def test_reservation_larger_than_burst_waits_longer() -> None:
    clock = FakeClock()
    limiter = BandwidthLimiter(MB, burst=MB, clock=clock)
    assert limiter.reserve(10 * MB) == pytest.approx(9.0)
    assert limiter.reserve(MB) == pytest.approx(10.0)  # queued after the first


def test_default_burst_is_one_second() -> None:
    limiter = BandwidthLimiter(2 * MB, clock=FakeClock())
    assert limiter.reserve(2 * MB) == 0.0
    assert limiter.reserve(2 * MB) == pytest.approx(1.0)


def test_unlimited_never_waits() -> None:
    limiter = BandwidthLimiter(None, clock=FakeClock())
    assert all(limiter.reserve(1 << 30) == 0.0 for _ in range(100))
    assert limiter.rate is None


def test_schedule_rules() -> None:
    s = BandwidthSchedule(
        [("08:00", "18:00", 1 * MB), ("22:00", "06:00", None), ("18:00", "24:00", 5 * MB)],
        default=2 * MB,
    )
    assert s.rate_at(time(8, 0)) == MB
    assert s.rate_at(time(17, 59)) == MB
    assert s.rate_at(time(18, 0)) == 5 * MB
    assert s.rate_at(time(19, 30)) == 5 * MB
    assert s.rate_at(time(23, 30)) is None  # the first matching rule wins
    assert s.rate_at(time(3, 0)) is None
    assert s.rate_at(time(6, 0)) == 2 * MB
    assert BandwidthSchedule([("00:00", "00:00", 7.0)]).rate_at(time(12, 0)) == 7.0
    for bad in ["8:00", "25:00", "12:60", "noon"]:
        with pytest.raises(ValueError, match="time of day"):
            BandwidthSchedule([(bad, "10:00", 1.0)])
    with pytest.raises(ValueError, match="positive"):
        BandwidthSchedule([("01:00", "02:00", 0.0)])


def test_limiter_switches_rate_by_time_of_day() -> None:
    clock = FakeClock()
    wall = [datetime(2024, 1, 1, 9, 0)]
    schedule = BandwidthSchedule([("08:00", "18:00", MB)], default=None)
    limiter = BandwidthLimiter(
        123.0, burst=MB, schedule=schedule, clock=clock, wall_clock=lambda: wall[0]
    )
    rate = limiter.rate
    assert rate == MB
    assert limiter.reserve(MB) == 0.0
    assert limiter.reserve(2 * MB) == pytest.approx(2.0)  # business hours: limited
    wall[0] = datetime(2024, 1, 1, 19, 0)
    rate = limiter.rate
    assert rate is None
    assert limiter.reserve(100 * MB) == 0.0  # evening: unlimited
    wall[0] = datetime(2024, 1, 2, 8, 30)
    clock.now += 1000.0
    assert limiter.reserve(MB) == 0.0  # limited again, starting with a full bucket
    assert limiter.reserve(MB) == pytest.approx(1.0)


def test_combined_waits_for_the_slowest() -> None:
    clock = FakeClock()
    relationship = BandwidthLimiter(MB, burst=MB, clock=clock)
    host = BandwidthLimiter(4 * MB, burst=MB, clock=clock)
    both = combined([relationship, host, None])
    assert both.reserve(MB) == 0.0
    assert both.reserve(4 * MB) == pytest.approx(4.0)
    assert both.rate == MB
    # the host bucket was charged too: another relationship on it waits
    assert host.reserve(MB) == pytest.approx(5 * MB / (4 * MB))
    assert combined([host]) is host
    assert combined([]).reserve(1 << 40) == 0.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        BandwidthLimiter(-1.0)
    with pytest.raises(ValueError, match="burst"):
        BandwidthLimiter(1.0, burst=0)
    with pytest.raises(ValueError, match="negative"):
        BandwidthLimiter(1.0).reserve(-1)

"""Bandwidth limits, per relationship and per host, optionally by time of day.

A :class:`BandwidthLimiter` is a token bucket that hands out *reservations*: the caller
asks for ``nbytes``, is told how long to wait, waits, and sends. Reservations are taken
in call order (first come, first served), and a reservation larger than the bucket is
allowed (it is paid for by a longer wait), so a caller never has to split its sends to
fit::

    await trio.sleep(limiter.reserve(len(frame)))
    await stream.send_all(frame)

A relationship limited both by its own limit and by the host's uses
``combined([relationship_limiter, host_limiter])``: each bucket is charged and the wait
is the longest of them. Time is read from injectable clocks (``clock`` for the bucket,
``wall_clock`` for the schedule), so tests and simulations drive it deterministically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from typing import Final

from .window import minutes, span_contains

#: Smallest default bucket: a burst never lower than this many bytes.
MIN_BURST: Final = 64 * 1024


def _check_rate(rate: float | None) -> float | None:
    if rate is None:
        return None
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"a rate is a positive number of bytes per second, not {rate}")
    return float(rate)


@dataclass(frozen=True)
class BandwidthRule:
    """From ``start`` (inclusive) to ``end`` (exclusive), ``rate`` bytes/s (None: no
    limit). A rule whose end is before its start runs past midnight."""

    start: str
    end: str
    rate: float | None


class BandwidthSchedule:
    """Rates by time of day.

    Args:
        rules: ``(start "HH:MM", end "HH:MM", bytes_per_s or None)``; the first rule that
            contains the time wins. ``"22:00"``-``"06:00"`` runs across midnight; an end
            of ``"24:00"`` means midnight; equal start and end mean the whole day.
        default: the rate outside every rule (None: no limit).
    """

    def __init__(
        self,
        rules: Sequence[tuple[str, str, float | None]] = (),
        default: float | None = None,
    ) -> None:
        self.rules = [BandwidthRule(s, e, _check_rate(r)) for s, e, r in rules]
        self.default = _check_rate(default)
        self._spans = [(minutes(r.start), minutes(r.end), r.rate) for r in self.rules]

    def rate_at(self, when: dtime) -> float | None:
        """The rate at time of day ``when`` (bytes/s, None for no limit)."""
        minute = when.hour * 60 + when.minute
        for start, end, rate in self._spans:
            if span_contains(start, end, minute):
                return rate
        return self.default

    def __repr__(self) -> str:
        rules = [(r.start, r.end, r.rate) for r in self.rules]
        return f"BandwidthSchedule({rules!r}, default={self.default!r})"


class BandwidthLimiter:
    """A token bucket of ``rate`` bytes per second (None: no limit).

    Args:
        rate: the rate when there is no schedule.
        burst: bucket size in bytes: how much may go at once after a quiet period. By
            default one second of the current rate, at least :data:`MIN_BURST`.
        schedule: rates by time of day; when given, it decides the rate (``rate`` is
            ignored).
        clock: monotonic seconds (the bucket's time).
        wall_clock: local date and time (for the schedule).
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: int | None = None,
        schedule: BandwidthSchedule | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = datetime.now,
    ) -> None:
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be positive, not {burst}")
        self._fixed_rate = _check_rate(rate)
        self.burst = burst
        self.schedule = schedule
        self._clock = clock
        self._wall_clock = wall_clock
        self._rate: float | None = None
        self._tokens = 0.0
        self._stamp = clock()
        self._apply_rate(self._current_rate(), refill=True)

    @property
    def rate(self) -> float | None:
        """The rate in force now (bytes/s), None for no limit."""
        return self._current_rate()

    def _current_rate(self) -> float | None:
        if self.schedule is None:
            return self._fixed_rate
        return self.schedule.rate_at(self._wall_clock().time())

    def _capacity(self, rate: float) -> float:
        if self.burst is not None:
            return float(self.burst)
        return max(rate, float(MIN_BURST))

    def _apply_rate(self, rate: float | None, *, refill: bool) -> None:
        if rate != self._rate:
            if rate is not None and (self._rate is None or refill):
                self._tokens = self._capacity(rate)
            self._rate = rate

    def set_rate(self, rate: float | None) -> None:
        """Change the rate used without a schedule (debt already owed is kept)."""
        self._fixed_rate = _check_rate(rate)

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket; return the seconds to wait before sending them
        (0.0 when they may go now, always 0.0 without a limit)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must not be negative, not {nbytes}")
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        old = self._rate
        if old is not None:
            # refill at the rate that was in force during the elapsed time
            self._tokens = min(self._capacity(old), self._tokens + elapsed * old)
        self._apply_rate(self._current_rate(), refill=False)
        rate = self._rate
        if rate is None:
            return 0.0
        self._tokens = min(self._tokens, self._capacity(rate)) - nbytes
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / rate


class CombinedLimiter(BandwidthLimiter):
    """Several limiters at once (e.g. a relationship's and its host's): every one is
    charged, and the wait is the longest."""

    def __init__(self, limiters: Iterable[BandwidthLimiter]) -> None:
        super().__init__(None)
        self.limiters = list(limiters)

    @property
    def rate(self) -> float | None:
        """The lowest rate in force now, None if none is limited."""
        rates = [r for r in (lim.rate for lim in self.limiters) if r is not None]
        return min(rates) if rates else None

    def reserve(self, nbytes: int) -> float:
        """Reserve ``nbytes`` from every limiter; the longest wait."""
        return max((lim.reserve(nbytes) for lim in self.limiters), default=0.0)


def combined(limiters: Iterable[BandwidthLimiter | None]) -> BandwidthLimiter:
    """One limiter that charges each of ``limiters`` (None entries are skipped) and
    waits for the slowest; a single limiter is returned as is."""
    present = [lim for lim in limiters if lim is not None]
    if len(present) == 1:
        return present[0]
    return CombinedLimiter(present)


class RelationshipLimit:
    """One relationship's own limiter, rebuilt when its rate changes (an operator's new
    limit takes effect at the next send), combined with the host's."""

    def __init__(self) -> None:
        self._rate: float | None = None
        self._own: BandwidthLimiter | None = None

    def at(self, rate: float | None, host: BandwidthLimiter | None) -> BandwidthLimiter | None:
        """The limiter for the relationship's current ``rate`` (None: no limit of its
        own) and the ``host``'s limiter, or None when neither is limited."""
        if rate != self._rate:
            self._rate = rate
            self._own = BandwidthLimiter(rate) if rate else None
        if self._own is None:
            return host
        return combined([self._own, host])

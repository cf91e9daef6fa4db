"""Times of day: ``"HH:MM"`` spans that may run past midnight (bandwidth schedules, the
resynchronization window)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time as dtime
from typing import Final

_HHMM: Final = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$|^24:00$")


def minutes(text: str) -> int:
    """Minutes since midnight of ``"HH:MM"`` (``"24:00"`` is midnight at the end).

    Raises:
        ValueError: not a time of day.
    """
    match = _HHMM.match(text)
    if not match:
        raise ValueError(f"not a time of day HH:MM (00:00-24:00): {text!r}")
    if text == "24:00":
        return 24 * 60
    return int(match.group(1)) * 60 + int(match.group(2))


def span_contains(start: int, end: int, minute: int) -> bool:
    """Whether ``minute`` is in ``[start, end)`` (minutes since midnight); a span whose
    end is before its start runs past midnight, equal ends mean the whole day."""
    if start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


@dataclass(frozen=True)
class TimeWindow:
    """From ``start`` (inclusive) to ``end`` (exclusive), local time, e.g. ``"22:00"`` to
    ``"06:00"`` for the night."""

    start: str
    end: str

    def __post_init__(self) -> None:
        minutes(self.start)
        minutes(self.end)

    def contains(self, when: dtime) -> bool:
        """Whether time of day ``when`` is inside the window."""
        return span_contains(minutes(self.start), minutes(self.end), when.hour * 60 + when.minute)

"""Time-of-day windows (the resynchronization window, bandwidth schedules)."""

from __future__ import annotations

from datetime import time

import pytest

from node.primary.window import TimeWindow


def test_a_window_across_midnight() -> None:
    night = TimeWindow("22:00", "06:00")
    assert night.contains(time(23, 30))
    assert night.contains(time(0, 0))
    assert night.contains(time(5, 59))
    assert not night.contains(time(6, 0))
    assert not night.contains(time(12, 0))
    assert night.contains(time(22, 0))


def test_a_day_window_and_the_whole_day() -> None:
    office = TimeWindow("08:00", "18:00")
    assert office.contains(time(8, 0))
    assert not office.contains(time(18, 0))
    assert TimeWindow("00:00", "00:00").contains(time(13, 7))
    assert TimeWindow("00:00", "24:00").contains(time(23, 59))


@pytest.mark.parametrize("bad", ["25:00", "7:00", "12:60", "noon", ""])
def test_bad_times_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="time of day"):
        TimeWindow(bad, "06:00")

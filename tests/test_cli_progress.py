"""frctl's progress line: percent, rate and time left (ir export/import, resync)."""

from __future__ import annotations

import io

from frctl.progress import MIB, ProgressLine


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_time_left_every_10_percent_off_a_terminal() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = ProgressLine("exporting web01", out, clock=clock)
    total = 1000 * MIB
    for step in range(11):
        progress(step * 100 * MIB, total)
        clock.now += 1.0  # 100 MiB a second
    lines = out.getvalue().splitlines()
    assert len(lines) == 11
    assert lines[0] == "exporting web01:   0% (0 of 1000 MiB)"
    assert lines[1] == "exporting web01:  10% (100 of 1000 MiB, 105 MB/s, 0:09 left)"
    assert lines[5] == "exporting web01:  50% (500 of 1000 MiB, 105 MB/s, 0:05 left)"
    assert lines[-1] == "exporting web01: 100% (1000 of 1000 MiB, 105 MB/s, 0:10)"


def test_a_resumed_transfer_counts_its_rate_from_where_it_resumed() -> None:
    out, clock = io.StringIO(), _Clock()
    progress = ProgressLine("importing db01", out, clock=clock)
    progress(900 * MIB, 1000 * MIB)  # 90% already there
    clock.now += 50.0
    assert progress.line(950 * MIB, 1000 * MIB) == (
        "importing db01:  95% (950 of 1000 MiB, 1.05 MB/s, 0:50 left)"
    )


def test_a_long_wait_reads_in_hours() -> None:
    clock = _Clock()
    progress = ProgressLine("x", io.StringIO(), clock=clock)
    progress(0, 10_000 * MIB)
    clock.now += 10.0
    assert progress.line(MIB, 10_000 * MIB).endswith("105 kB/s, 27:46:30 left)")

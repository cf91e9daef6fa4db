"""What an IR covered (REP-32), where it may resume (REP-13), and which chunks may
overlap an earlier one (CHK-25): :class:`node.ir_coverage.IRCoverage`."""

from __future__ import annotations

import random

import pytest

from node.ir_coverage import IRCoverage

SIZES = [1000, 300, 50]


def test_in_order_chunks_cover_every_disk() -> None:
    cov = IRCoverage(SIZES)
    for disk, size in enumerate(SIZES):
        for offset in range(0, size, 100):
            assert not cov.add(disk, offset, min(100, size - offset))
    assert cov.complete
    assert cov.cursor == (3, 0)


def test_no_chunk_covers_nothing_from_the_start() -> None:
    # The IR of a new replica that starts past the disks, with no chunk (issue point 3).
    cov = IRCoverage(SIZES)
    assert not cov.complete
    assert cov.cursor == (0, 0)
    assert cov.position(3, 0) > cov.frontier  # its start is past the resume point


def test_a_gap_stops_the_frontier_until_it_is_filled() -> None:
    cov = IRCoverage(SIZES)
    cov.add(0, 0, 400)
    cov.add(0, 500, 500)  # gap 400-500
    cov.add(1, 0, 300)
    cov.add(2, 0, 50)
    assert not cov.complete
    assert cov.cursor == (0, 400)
    cov.add(0, 400, 100)  # filled: everything waiting joins
    assert cov.complete


def test_resume_point_counts_as_covered() -> None:
    cov = IRCoverage(SIZES, resume=(1, 100))
    assert cov.cursor == (1, 100)
    cov.add(1, 100, 200)
    assert cov.cursor == (2, 0)  # the end of a disk is the start of the next
    cov.add(2, 0, 50)
    assert cov.complete


def test_the_end_of_a_disk_is_the_start_of_the_next() -> None:
    cov = IRCoverage(SIZES)
    assert cov.position(0, 1000) == cov.position(1, 0)
    assert cov.position(3, 0) == cov.total == 1350
    assert cov.point(1000) == (1, 0)
    assert cov.point(1350) == (3, 0)
    with pytest.raises(ValueError, match="not a point"):
        cov.position(4, 0)


def test_overlap_is_reported_for_a_chunk_that_starts_before_an_earlier_end() -> None:
    cov = IRCoverage(SIZES)
    assert not cov.add(0, 0, 500)
    assert cov.add(0, 250, 100)  # inside the first one
    assert not cov.add(0, 500, 500)
    assert cov.add(0, 999, 1)
    assert not cov.add(1, 0, 300)  # the next disk: no byte in common


@pytest.mark.parametrize("seed", range(20))
def test_any_order_with_overlaps_agrees_with_a_byte_map(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.randint(1, 400) for _ in range(rng.randint(1, 4))]
    resume_disk = rng.randrange(len(sizes))
    resume = (resume_disk, rng.randint(0, sizes[resume_disk]))
    cov = IRCoverage(sizes, resume)
    bases = [sum(sizes[:i]) for i in range(len(sizes))]
    covered = [False] * sum(sizes)
    for p in range(bases[resume[0]] + resume[1]):
        covered[p] = True
    seen_end = 0
    for _ in range(rng.randint(0, 40)):
        disk = rng.randrange(len(sizes))
        offset = rng.randrange(sizes[disk])
        length = rng.randint(1, sizes[disk] - offset)
        start = bases[disk] + offset
        assert cov.add(disk, offset, length) == (start < seen_end)
        seen_end = max(seen_end, start + length)
        for p in range(start, start + length):
            covered[p] = True
        frontier = next((p for p, c in enumerate(covered) if not c), len(covered))
        assert cov.frontier == frontier
        assert cov.complete == all(covered)

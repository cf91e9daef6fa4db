"""ChangeTracker: marking, bounds, take/restore, persistence."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from node.primary.tracker import ChangeTracker, TrackerCorrupt

BS = 65536


def test_marks_every_block_a_range_touches() -> None:
    t = ChangeTracker([10 * BS + 100, 4 * BS], BS)
    t.report_write(0, BS - 1, 2)  # straddles blocks 0 and 1
    t.report_write(0, 5 * BS, BS)  # exactly block 5
    t.report_write(0, 10 * BS, 100)  # the last, partial block
    t.report_write(1, 0, 1)
    assert t.dirty_blocks() == {0: [0, 1, 5, 10], 1: [0]}


def test_large_range_sets_whole_bytes() -> None:
    t = ChangeTracker([100 * BS], BS)
    t.report_write(0, 3 * BS + 7, 60 * BS)  # blocks 3..63
    assert t.dirty_blocks() == {0: list(range(3, 64))}
    assert t.dirty_count() == 61


def test_zero_length_marks_nothing() -> None:
    t = ChangeTracker([BS], BS)
    t.report_write(0, BS, 0)
    assert t.dirty_blocks() == {}


@pytest.mark.parametrize(
    ("disk", "offset", "length"),
    [(2, 0, 1), (-1, 0, 1), (0, -1, 1), (0, 0, -1), (0, 4 * BS, 1), (0, 4 * BS - 1, 2)],
)
def test_bounds_are_checked(disk: int, offset: int, length: int) -> None:
    t = ChangeTracker([4 * BS, BS], BS)
    with pytest.raises(ValueError, match="disk"):
        t.report_write(disk, offset, length)
    assert t.dirty_blocks() == {}


def test_take_clears_and_restore_puts_back() -> None:
    t = ChangeTracker([8 * BS, 8 * BS], BS)
    t.report_write(0, 0, 3 * BS)
    t.report_write(1, 7 * BS, 10)
    taken = t.take()
    assert taken == {0: [0, 1, 2], 1: [7]}
    assert t.dirty_blocks() == {}
    t.report_write(0, 5 * BS, 1)  # a write during the failed cycle
    t.restore(taken)
    assert t.dirty_blocks() == {0: [0, 1, 2, 5], 1: [7]}
    with pytest.raises(ValueError, match="outside"):
        t.restore({0: [8]})
    with pytest.raises(ValueError, match="no disk"):
        t.restore({3: [0]})


def test_concurrent_reports_and_takes_lose_nothing() -> None:
    t = ChangeTracker([4096 * BS], BS)
    seen: set[int] = set()

    def writer(start: int) -> None:
        for block in range(start, 4096, 4):
            t.report_write(0, block * BS, 1)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        seen.update(t.take().get(0, []))
    for th in threads:
        th.join()
    seen.update(t.take().get(0, []))
    assert seen == set(range(4096))


def test_save_load_round_trip(tmp_path: Path) -> None:
    t = ChangeTracker([13 * BS + 5, 0, 3 * BS], BS)
    t.report_write(0, 12 * BS, BS + 5)
    t.report_write(2, BS, 2)
    path = tmp_path / "tracker.bin"
    t.save(path)
    u = ChangeTracker.load(path)
    assert u.dirty_blocks() == t.dirty_blocks() == {0: [12, 13], 2: [1]}
    assert u.disk_sizes == t.disk_sizes
    assert u.block_size == BS
    assert not u.lost
    u.mark_lost()
    u.save(path)
    assert ChangeTracker.load(path).lost
    assert [p.name for p in tmp_path.iterdir()] == ["tracker.bin"]  # no temp file left


def test_compact_file(tmp_path: Path) -> None:
    t = ChangeTracker([1 << 30], BS)  # 16384 blocks -> 2 KiB of bitmap
    t.save(tmp_path / "t")
    assert (tmp_path / "t").stat().st_size < 2048 + 64


def test_corrupt_file_detected_and_load_or_lost(tmp_path: Path) -> None:
    path = tmp_path / "t"
    t = ChangeTracker([8 * BS], BS)
    t.report_write(0, 0, 1)
    t.save(path)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1
    path.write_bytes(raw)
    with pytest.raises(TrackerCorrupt):
        ChangeTracker.load(path)
    fresh = ChangeTracker.load_or_lost(path, [8 * BS], BS)
    assert fresh.lost
    assert fresh.dirty_blocks() == {}
    assert ChangeTracker.load_or_lost(tmp_path / "missing", [BS], BS).lost
    t.save(path)
    assert not ChangeTracker.load_or_lost(path, [8 * BS], BS).lost
    assert ChangeTracker.load_or_lost(path, [9 * BS], BS).lost  # other disks

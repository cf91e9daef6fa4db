"""PendingLog: append/read/drop, the bound and overflow, torn files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import xxhash

from node.primary.pending_log import (
    CYCLE_OVERHEAD,
    RECORD_OVERHEAD,
    PendingCycle,
    PendingLog,
    PendingLogCorrupt,
    PendingLogFull,
)

Chunk = tuple[int, int, bytes]


def _chunks(seed: int, n: int = 5, size: int = 4096) -> list[Chunk]:
    rng = random.Random(seed)
    return [(rng.randrange(3), rng.randrange(1 << 30), rng.randbytes(size)) for _ in range(n)]


def test_append_read_drop(tmp_path: Path) -> None:
    log = PendingLog(tmp_path / "p", max_bytes=1 << 20)
    assert log.cycles() == []
    assert log.size_bytes == 0
    a, b = _chunks(1), _chunks(2, n=3, size=100)
    written = log.append_cycle(1, 1000, a)
    assert written == CYCLE_OVERHEAD + 5 * (RECORD_OVERHEAD + 4096)
    log.append_cycle(2, 2000, iter([(d, o, memoryview(x)) for d, o, x in b]))
    log.append_cycle(3, 3000, [])  # an empty cycle is allowed
    assert [(c.sequence, c.captured_at_ms, c.nbytes, c.chunk_count) for c in log.cycles()] == [
        (1, 1000, 5 * 4096, 5),
        (2, 2000, 300, 3),
        (3, 3000, 0, 0),
    ]
    assert list(log.read_cycle(1)) == a
    assert list(log.read_cycle(2)) == b
    assert log.size_bytes == sum(c.file_bytes for c in log.cycles())
    with pytest.raises(ValueError, match="not above"):
        log.append_cycle(3, 0, [])  # not above the last
    log.drop_through(2)
    assert [c.sequence for c in log.cycles()] == [3]
    with pytest.raises(KeyError):
        log.read_cycle(1)
    # reopen: the same cycles
    again = PendingLog(tmp_path / "p", max_bytes=1 << 20)
    assert again.cycles() == log.cycles()
    assert list(again.read_cycle(3)) == []


def test_chunks_from_a_reused_buffer(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    buf = bytearray(16)

    def produce() -> object:
        for i in range(3):
            buf[:] = bytes([i]) * 16
            yield 0, i * 16, memoryview(buf)

    log.append_cycle(1, 0, produce())  # type: ignore[arg-type]
    assert [d for _, _, d in log.read_cycle(1)] == [bytes([i]) * 16 for i in range(3)]


def test_bound_refuses_whole_cycle_and_overflow_persists(tmp_path: Path) -> None:
    one = CYCLE_OVERHEAD + 2 * (RECORD_OVERHEAD + 4096)
    log = PendingLog(tmp_path, max_bytes=2 * one + 10)
    log.append_cycle(1, 0, _chunks(1, n=2))
    log.append_cycle(2, 0, _chunks(2, n=2))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PendingLogFull):
        log.append_cycle(3, 0, _chunks(3, n=2))
    assert log.overflowed
    assert [c.sequence for c in log.cycles()] == [1, 2]
    assert log.size_bytes <= log.max_bytes
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "OVERFLOWED"])  # nothing of 3
    # refused while overflowed, even if it would fit now
    log.drop_through(2)
    with pytest.raises(PendingLogFull):
        log.append_cycle(3, 0, [])
    reopened = PendingLog(tmp_path, max_bytes=2 * one + 10)
    assert reopened.overflowed
    reopened.clear_overflow()
    assert not PendingLog(tmp_path, max_bytes=1).overflowed
    reopened.append_cycle(3, 0, _chunks(3, n=2))
    assert reopened.cycles()[0].sequence == 3
    reopened.clear()
    assert reopened.cycles() == []
    assert reopened.size_bytes == 0


def test_failing_producer_keeps_nothing(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)

    def produce() -> object:
        yield 0, 0, b"x" * 10
        raise OSError("read failed")

    with pytest.raises(OSError, match="read failed"):
        log.append_cycle(1, 0, produce())  # type: ignore[arg-type]
    assert log.cycles() == []
    assert os.listdir(tmp_path) == []
    assert not log.overflowed


def test_leftover_temp_file_removed_on_open(tmp_path: Path) -> None:
    (tmp_path / f"{7:020d}.cycle.tmp").write_bytes(b"half a cycle")
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    assert log.cycles() == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cut", [CYCLE_OVERHEAD // 2, 32 + 10, 32 + 40 + 100, -1])
def test_torn_tail_detected(tmp_path: Path, cut: int) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    size = path.stat().st_size
    os.truncate(path, size + cut if cut < 0 else cut)
    with pytest.raises(PendingLogCorrupt):
        list(log.read_cycle(1))  # detected by the open log
    reopened = PendingLog(tmp_path, max_bytes=1 << 20)
    (cycle,) = reopened.cycles()
    assert cycle == PendingCycle(1, cycle.captured_at_ms, 0, 0, False, path.stat().st_size)
    with pytest.raises(PendingLogCorrupt):
        list(reopened.read_cycle(1))
    reopened.drop_through(1)
    assert reopened.cycles() == []


@pytest.mark.parametrize("where", [40, 32 + 40 + 5000, -10])
def test_flipped_byte_detected(tmp_path: Path, where: int) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 1
    path.write_bytes(raw)
    with pytest.raises(PendingLogCorrupt):
        list(log.read_cycle(1))


def test_log_usable_while_an_append_runs(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1, n=1))
    seen: list[list[int]] = []

    def produce() -> object:
        yield 0, 0, b"a" * 10
        seen.append([c.sequence for c in log.cycles()])  # no deadlock: lock not held
        log.drop_through(1)  # the ack of cycle 1 arrives meanwhile
        with pytest.raises(RuntimeError, match="in progress"):
            log.append_cycle(3, 0, [])
        yield 0, 10, b"b" * 10

    log.append_cycle(2, 0, produce())  # type: ignore[arg-type]
    assert seen == [[1]]
    assert [c.sequence for c in log.cycles()] == [2]
    assert [d for _, _, d in log.read_cycle(2)] == [b"a" * 10, b"b" * 10]


def test_extents_without_reading_the_data(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    a = _chunks(1)
    log.append_cycle(1, 0, a)
    log.append_cycle(2, 0, [])
    assert list(log.extents(1)) == [(d, o, len(x)) for d, o, x in a]
    assert list(log.extents(2)) == []
    with pytest.raises(KeyError):
        log.extents(3)
    reopened = PendingLog(tmp_path, max_bytes=1 << 20)
    assert list(reopened.extents(1)) == list(log.extents(1))


@pytest.mark.parametrize("cut", [CYCLE_OVERHEAD // 2, 32 + 10, 32 + 40 + 100, -1])
def test_extents_of_a_torn_cycle(tmp_path: Path, cut: int) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    os.truncate(path, path.stat().st_size + cut if cut < 0 else cut)
    with pytest.raises(PendingLogCorrupt):
        list(log.extents(1))
    with pytest.raises(PendingLogCorrupt):
        list(PendingLog(tmp_path, max_bytes=1 << 20).extents(1))


# 10: the header; 38: the first record's length; 32 + 40 + 4096 + 6: the second record's
# length; 32 + 4 * (40 + 4096) + 36: the last record's checksum (against the trailer's);
# -10: the trailer.
@pytest.mark.parametrize("where", [10, 38, 32 + 40 + 4096 + 6, 32 + 4 * (40 + 4096) + 36, -10])
def test_extents_notice_damaged_framing(tmp_path: Path, where: int) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 1
    path.write_bytes(raw)
    with pytest.raises(PendingLogCorrupt):
        list(log.extents(1))


def test_extents_do_not_check_the_data(tmp_path: Path) -> None:
    """The limit of the cheap walk (documented): a damaged data byte shows only when the
    data is read."""
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    a = _chunks(1)
    log.append_cycle(1, 0, a)
    path = log.path_of(1)
    raw = bytearray(path.read_bytes())
    raw[32 + 40 + 100] ^= 1  # inside the first record's data
    path.write_bytes(raw)
    assert list(log.extents(1)) == [(d, o, len(x)) for d, o, x in a]
    with pytest.raises(PendingLogCorrupt):
        list(log.read_cycle(1))


def test_the_capture_digest_travels_with_the_record(tmp_path: Path) -> None:
    """Digest once: a digest handed in is kept as it is (not recomputed) and comes back
    with the data from read_chunks, which does not digest the data; read_cycle and
    check_cycle do, and so notice a digest that does not match the data."""
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    a = _chunks(1)
    given = [(d, o, x, xxhash.xxh3_128_digest(x)) for d, o, x in a]
    log.append_cycle(1, 0, given)
    # each chunk's data is a view valid until the next: copied as it comes
    assert [(d, o, bytes(x), g) for d, o, x, g in log.read_chunks(1)] == given
    log.check_cycle(1)
    # A digest the capture got wrong (or data damaged after it) travels unnoticed by the
    # sender's read: the receiver's check is the one check of the data.
    wrong = [(d, o, x, bytes(16)) for d, o, x in a]
    log.append_cycle(2, 0, wrong)
    assert [c[3] for c in log.read_chunks(2)] == [bytes(16)] * len(a)
    with pytest.raises(PendingLogCorrupt, match="data mismatch"):
        log.check_cycle(2)
    with pytest.raises(PendingLogCorrupt, match="data mismatch"):
        list(log.read_cycle(2))
    # Without a digest given, the log takes one.
    log.append_cycle(3, 0, a)
    assert [c[3] for c in log.read_chunks(3)] == [d for *_, d in given]


def test_a_damaged_data_byte_is_left_to_the_receiver(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    raw = bytearray(path.read_bytes())
    raw[32 + RECORD_OVERHEAD + 100] ^= 1  # inside the first record's data
    path.write_bytes(raw)
    reading = log.read_chunks(1)
    first = next(reading)
    assert xxhash.xxh3_128_digest(first[2]) != first[3]  # the server will refuse it
    reading.close()
    with pytest.raises(PendingLogCorrupt):
        log.check_cycle(1)


def test_read_chunks_hands_out_views_valid_until_the_next_chunk(tmp_path: Path) -> None:
    # Sending reads the cycle through a memory map, no copy: a view kept past its turn is
    # released (an error to use, never another chunk's bytes).
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    chunks = _chunks(1)
    log.append_cycle(1, 0, chunks)
    views = []
    for (_d, _o, data, _g), (_, _, expected) in zip(log.read_chunks(1), chunks, strict=True):
        assert bytes(data) == expected
        views.append(data)
    with pytest.raises(ValueError, match="released"):
        bytes(views[0])


def test_a_format_1_file_reads_as_not_intact(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 20)
    log.append_cycle(1, 0, _chunks(1))
    path = log.path_of(1)
    raw = bytearray(path.read_bytes())
    raw[4:6] = (1).to_bytes(2, "big")
    path.write_bytes(raw)
    (cycle,) = PendingLog(tmp_path, max_bytes=1 << 20).cycles()
    assert not cycle.intact

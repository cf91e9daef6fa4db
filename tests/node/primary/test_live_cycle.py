"""LiveCycle: a cycle's records read while the pending log writes them
(``node/primary/live_cycle.py``), and the sized append it rests on."""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import xxhash

from node.primary.live_cycle import CaptureFailed, LiveCycle
from node.primary.pending_log import (
    CYCLE_OVERHEAD,
    RECORD_OVERHEAD,
    CyclePlan,
    PendingLog,
    PendingLogFull,
)

Chunk = tuple[int, int, bytes]


def _chunks(seed: int, n: int = 6, size: int = 5000) -> list[Chunk]:
    rng = random.Random(seed)
    return [(rng.randrange(2), rng.randrange(1 << 30), rng.randbytes(size)) for _ in range(n)]


def _size(chunks: list[Chunk]) -> tuple[int, int]:
    return len(chunks), sum(len(c[2]) for c in chunks)


async def _read_all(live: LiveCycle, got: list[tuple[int, int, bytes, bytes]]) -> None:
    async for disk_index, offset, data, digest in live.chunks():
        got.append((disk_index, offset, bytes(data), digest))


async def test_records_are_read_while_the_capture_still_writes(tmp_path: Path) -> None:
    """The writer stops after its first record until the reader has it: the reader gets
    records before the cycle is whole (else this deadlocks and times out)."""
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    chunks = _chunks(1)
    first_read = threading.Event()
    live = LiveCycle()
    got: list[tuple[int, int, bytes, bytes]] = []

    def gated() -> Iterator[Chunk]:
        for i, chunk in enumerate(chunks):
            if i == 1:
                assert first_read.wait(10), "the reader did not get the first record"
            yield chunk

    async def read() -> None:
        async for disk_index, offset, data, digest in live.chunks():
            got.append((disk_index, offset, bytes(data), digest))
            first_read.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            plan = None

            async def write() -> None:
                await trio.to_thread.run_sync(
                    lambda: log.append_cycle(7, 1234, gated(), expected=_size(chunks), reader=live)
                )
                live.finish()

            nursery.start_soon(write)
            plan = await live.decided()
            nursery.start_soon(read)
        await live.finished()
    live.close()
    assert plan == CyclePlan(7, 1234, *_size(chunks))
    assert got == [(d, o, x, xxhash.xxh3_128_digest(x)) for d, o, x in chunks]
    assert [c.sequence for c in log.cycles()] == [7]
    assert list(log.read_cycle(7)) == chunks
    assert log.path_of(7).stat().st_size == plan.file_size


async def test_a_capture_that_fails_ends_the_stream(tmp_path: Path) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    chunks = _chunks(2)
    live = LiveCycle()
    got: list[tuple[int, int, bytes, bytes]] = []

    def failing() -> Iterator[Chunk]:
        yield from chunks[:3]
        raise OSError(errno.EIO, "the disk failed")

    async def write() -> None:
        try:
            await trio.to_thread.run_sync(
                lambda: log.append_cycle(1, 1, failing(), expected=_size(chunks), reader=live)
            )
        except OSError as exc:
            live.fail(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            assert await live.decided() is not None
            with pytest.raises(CaptureFailed, match=r"after 3 of 6 chunks: .*the disk failed"):
                await _read_all(live, got)
        with pytest.raises(CaptureFailed, match="the disk failed"):
            await live.finished()
    live.close()
    assert len(got) == 3
    assert log.cycles() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .tmp left


async def test_a_reader_started_after_the_capture_reads_it_all(tmp_path: Path) -> None:
    """A second session (a re-query) reads the cycle from its start, also once the
    cycle is renamed into place."""
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    chunks = _chunks(3)
    live = LiveCycle()
    await trio.to_thread.run_sync(
        lambda: log.append_cycle(2, 5, chunks, expected=_size(chunks), reader=live)
    )
    live.finish()
    for _ in range(2):
        got: list[tuple[int, int, bytes, bytes]] = []
        await _read_all(live, got)
        assert [(d, o, x) for d, o, x, _ in got] == chunks
    await live.finished()
    live.close()


async def test_no_cycle_when_nothing_was_begun() -> None:
    live = LiveCycle()
    live.finish()
    assert await live.decided() is None
    await live.finished()
    live.close()


def test_a_sized_cycle_past_the_bound_is_refused_before_a_byte(tmp_path: Path) -> None:
    chunks = _chunks(4)
    count, nbytes = _size(chunks)
    bound = CYCLE_OVERHEAD + count * RECORD_OVERHEAD + nbytes - 1
    log = PendingLog(tmp_path, max_bytes=bound)
    began: list[object] = []

    class Reader:
        def begin(self, path: Path, plan: CyclePlan) -> None:
            began.append(plan)

        def record(self, *args: object) -> None:
            began.append(args)

    def untouched() -> Iterator[Chunk]:
        raise AssertionError("a chunk was taken from a refused cycle")
        yield  # pragma: no cover

    with pytest.raises(PendingLogFull, match="would pass"):
        log.append_cycle(1, 1, untouched(), expected=(count, nbytes), reader=Reader())
    assert began == []
    assert log.overflowed
    assert PendingLog(tmp_path, max_bytes=bound).overflowed  # durably
    assert log.cycles() == []


@pytest.mark.parametrize("short", [True, False], ids=["fewer", "more"])
def test_chunks_that_do_not_match_their_size_keep_nothing(tmp_path: Path, short: bool) -> None:
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    chunks = _chunks(5)
    count, nbytes = _size(chunks)
    expected = (count + 1, nbytes + 10) if short else (count - 1, nbytes - len(chunks[-1][2]))
    with pytest.raises(ValueError, match="expected"):
        log.append_cycle(1, 1, chunks, expected=expected)
    assert log.cycles() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_sized_cycle_over_the_spare_is_cut_to_its_size(tmp_path: Path) -> None:
    """The spare of a larger cycle is cut to the new cycle's size before its records."""
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    big, small = _chunks(6, n=9), _chunks(7, n=2)
    log.append_cycle(1, 1, big, expected=_size(big))
    log.drop_through(1)
    assert (tmp_path / "SPARE").exists()
    written = log.append_cycle(2, 2, small, expected=_size(small))
    assert written == CYCLE_OVERHEAD + 2 * (RECORD_OVERHEAD + 5000)
    assert log.path_of(2).stat().st_size == written
    assert list(PendingLog(tmp_path, max_bytes=1 << 24).read_cycle(2)) == small

"""The recovery server's IR write queue: overlapped O_DIRECT writes, errors, draining."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import trio

import frproto
from frproto import IRState
from node.ir_writes import IRWriteQueue
from node.storage import Replica, ReplicaStore, StorageFaults
from tests.node.storage import workload as wl
from tests.node.storage.test_replica import make

MiB = 1 << 20


def _ir_replica(root: Path, faults: StorageFaults | None = None) -> Replica:
    replica = make(ReplicaStore(root, faults=faults))
    replica.begin_ir(wl.IR_SEQUENCE)
    return replica


async def test_queued_writes_land_exactly_and_stay_sparse(tmp_path: Path) -> None:
    replica = _ir_replica(tmp_path)
    chunks = list(wl.ir_chunks(11))
    async with trio.open_nursery() as nursery:
        queue = IRWriteQueue(nursery, depth=3)
        for c in chunks:
            if c.data is None:
                await queue.write(replica, c.disk_index, c.offset, None, length=c.length)
            else:
                buf = bytearray(c.data)
                await queue.write(replica, c.disk_index, c.offset, memoryview(buf), length=c.length)
                buf[:] = b"\x00" * len(buf)  # the queue copied it: reusing it is safe
        await queue.drain()
    replica.complete_ir(wl.IR_SEQUENCE)
    assert replica.ir_state is IRState.COMPLETE

    reference = _ir_replica(tmp_path / "ref")
    for c in chunks:
        reference.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
    for i in range(len(replica.disks)):
        got = replica.image_path(i)
        assert got.read_bytes() == reference.image_path(i).read_bytes()
        # Zero chunks were never written: the image holds less than its size.
        assert os.stat(got).st_blocks * 512 < replica.disks[i].size


async def test_aligned_chunks_go_through_o_direct(tmp_path: Path) -> None:
    # O_DIRECT leaves the page cache empty for the range; a buffered write fills it.
    # Check it where the file system supports O_DIRECT (ext4/xfs, not tmpfs).
    replica = _ir_replica(tmp_path)
    data = os.urandom(MiB)
    async with trio.open_nursery() as nursery:
        queue = IRWriteQueue(nursery)
        await queue.write(replica, 0, 0, data, length=len(data))
        await queue.drain()
    if replica.direct_io is False:
        pytest.skip("this file system refuses O_DIRECT; the buffered path was used")
    assert replica.direct_io, "an aligned chunk should have opened the O_DIRECT descriptor"
    with replica.image_path(0).open("rb") as f:
        assert f.read(MiB) == data


async def test_a_page_aligned_view_is_written_without_a_copy(tmp_path: Path) -> None:
    # A chunk's payload lies page-aligned in its pooled frame buffer: the queue writes
    # from it (keeping it viewed until written) instead of copying it.
    replica = _ir_replica(tmp_path)
    frame = mmap.mmap(-1, 2 * mmap.PAGESIZE + MiB)
    payload = os.urandom(MiB)
    frame[mmap.PAGESIZE : mmap.PAGESIZE + MiB] = payload
    async with trio.open_nursery() as nursery:
        queue = IRWriteQueue(nursery)
        view = memoryview(frame)[mmap.PAGESIZE : mmap.PAGESIZE + MiB]
        await queue.write(replica, 0, 0, view, length=MiB)
        del view
        await queue.drain()
        assert queue.copy_buffers == 0  # no aligned buffer was needed
        with replica.image_path(0).open("rb") as f:
            assert f.read(MiB) == payload
        # not page-aligned: copied into an aligned buffer of the queue
        odd = memoryview(frame)[1 : 1 + MiB]
        await queue.write(replica, 0, 0, odd, length=MiB)
        expected = bytes(odd)
        odd[:] = b"\x00" * MiB  # the queue copied it: reusing it is safe
        del odd
        await queue.drain()
        assert queue.copy_buffers == 1
    frame.resize(len(frame))  # no view of the frame is left
    with replica.image_path(0).open("rb") as f:
        assert f.read(MiB) == expected


def _descriptors_of(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve()):
                count += 1
        except OSError:
            continue
    return count


async def test_the_o_direct_descriptor_is_closed_when_the_ir_completes(tmp_path: Path) -> None:
    # A node holds every replica open: one descriptor per image for its life, not two
    # (bench/scale.py: 334 for 167 one-disk replicas before this).
    replica = _ir_replica(tmp_path)
    data = os.urandom(MiB)
    async with trio.open_nursery() as nursery:
        queue = IRWriteQueue(nursery)
        await queue.write(replica, 0, 0, data, length=len(data))
        await queue.drain()
    if replica.direct_io is False:
        pytest.skip("this file system refuses O_DIRECT; the buffered path was used")
    image = replica.image_path(0)
    assert _descriptors_of(image) == 2
    replica.complete_ir(wl.IR_SEQUENCE)
    assert _descriptors_of(image) == 1
    assert replica.direct_io is True  # what the IR did, still said
    with image.open("rb") as f:
        assert f.read(MiB) == data


async def test_a_failed_write_is_reported_by_drain_and_the_next_write(tmp_path: Path) -> None:
    full = False

    def before_write(path: Path, nbytes: int) -> None:
        if full and path.suffix == ".img":
            raise OSError(errno.ENOSPC, "No space left on device")

    replica = _ir_replica(tmp_path, StorageFaults(before_write=before_write))
    data = os.urandom(64 * 1024)
    async with trio.open_nursery() as nursery:
        queue = IRWriteQueue(nursery, depth=1)
        await queue.write(replica, 0, 0, data, length=len(data))
        await queue.drain()
        full = True
        await queue.write(replica, 0, 64 * 1024, data, length=len(data))
        with pytest.raises(frproto.NoSpace):
            await queue.drain()
        # The error was reported once: the next write is queued, and fails too.
        await queue.write(replica, 0, 128 * 1024, data, length=len(data))
        with pytest.raises(frproto.NoSpace):
            await queue.write(replica, 0, 192 * 1024, data, length=len(data))
    # Nothing was checkpointed: a restarted IR starts over, the error changed no state.
    assert replica.ir_state is IRState.IN_PROGRESS
    assert replica.ir_cursor == (0, 0)

"""Online verification and resynchronization, against a real recovery server process:
verification finds a block corrupted on purpose and nothing otherwise; a
resynchronization after lost change tracking, or an overflowed pending log, sends about
only the blocks that changed. With a tracker that survived an overflow, the pending log's
blocks plus the dirty bitmap are sent without asking for the replica's digests; a lost
tracker, or a damaged pending log, is resynchronized by digests."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest
import trio

from frtesting.server import ServerProcess
from node.primary.client import RecoveryClient
from node.primary.pending_log import CYCLE_OVERHEAD, RECORD_OVERHEAD
from node.primary.replicator import VMReplicator
from node.primary.resync import ResyncResult
from node.primary.tracker import ChangeTracker

from .site import Site
from .test_replication_e2e import MIB, make_image, server

__all__ = ["server"]  # the fixture, shared with the replication tests

BLOCK = 65536


def change_blocks(path: Path, rng: random.Random, count: int) -> set[int]:
    """Overwrite ``count`` random whole blocks; the block indices."""
    blocks = set(rng.sample(range(path.stat().st_size // BLOCK), count))
    with path.open("r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))
    return blocks


def one_vm(
    site: Site, server: ServerProcess, seed: int, size: int
) -> tuple[random.Random, uuid.UUID, Path, VMReplicator]:
    """A seeded random source, a VMID, a disk image of ``size`` bytes and its replicator."""
    rng = random.Random(seed)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", size, rng)
    return rng, vmid, image, site.replicator(vmid, "vm", [image], server.port)


async def test_verification_finds_a_corrupted_block_and_nothing_otherwise(
    site: Site, server: ServerProcess
) -> None:
    rng, vmid, image, vm = one_vm(site, server, 21, 4 * MIB)
    with trio.fail_after(60):
        await vm.cycle()
        change_blocks(image, rng, 5)
        await vm.cycle()
        clean = await vm.verify()
        assert clean.ok
        assert clean.blocks == 64
        # Corrupt one byte of block 10 in the replica, behind the server's back.
        replica = site.replica_image(vmid, 0)
        with replica.open("r+b") as f:
            f.seek(10 * BLOCK + 123)
            byte = f.read(1)
            f.seek(10 * BLOCK + 123)
            f.write(bytes([byte[0] ^ 0xFF]))
        found = await vm.verify()
    assert not found.ok
    assert [(d.disk_index, d.offset, d.length) for d in found.differences] == [
        (0, 10 * BLOCK, BLOCK)
    ]


async def test_resync_after_lost_tracking_sends_only_what_changed(
    site: Site, server: ServerProcess
) -> None:
    rng, vmid, image, vm = one_vm(site, server, 22, 8 * MIB)
    size = image.stat().st_size
    vm.tracker = ChangeTracker([size], BLOCK)
    with trio.fail_after(60):
        await vm.cycle()  # IR
        # The primary restarts without its tracker's bitmap while the disk changed
        # (writes made while replication was off): nothing reports these writes.
        changed = change_blocks(image, rng, 13)
        again = site.restarted(vm, tracker=ChangeTracker([size], BLOCK))
        await again.cycle()
        assert site.replica_image(vmid, 0).read_bytes() != image.read_bytes()  # missed
        seen: list[tuple[int, int]] = []
        result = await again.resync(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (size, size)  # progress, in order, to the end
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.blocks == -(-size // BLOCK)
    assert result.blocks_sent == len(changed)  # only the changed blocks crossed
    assert result.bytes_sent == len(changed) * BLOCK
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert (await again.verify()).ok


async def test_an_overflowed_pending_log_resyncs_instead_of_halting(
    site: Site, server: ServerProcess
) -> None:
    rng, vmid, image, first = one_vm(site, server, 23, 8 * MIB)
    with trio.fail_after(60):
        await first.cycle()  # IR
        # A bound of 256 KiB: 40 changed blocks (2.5 MiB) do not fit.
        vm = site.restarted(first, pending_bytes=256 * 1024)
        resyncs: list[int] = []
        real_resync = vm.resync

        async def counted(*args: object) -> object:
            resyncs.append(1)
            return await real_resync()

        vm.resync = counted  # type: ignore[method-assign, assignment]
        changed = change_blocks(image, rng, 40)
        await vm.cycle()  # the capture overflows; the cycle resynchronizes
    assert resyncs == [1]
    assert not vm.pending.overflowed
    assert vm.state.health != "critical"
    assert vm.state.sequence == 1
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert len(changed) == 40


async def test_an_automatic_resync_waits_for_its_window(site: Site, server: ServerProcess) -> None:
    from datetime import datetime

    from node.primary.window import TimeWindow

    rng, vmid, image, first = one_vm(site, server, 24, 4 * MIB)
    noon = datetime(2026, 11, 24, 12, 0)
    with trio.fail_after(60):
        await first.cycle()  # IR
        vm = site.restarted(
            first,
            pending_bytes=64 * 1024,
            resync_window=TimeWindow("22:00", "06:00"),
            wall_clock=lambda: noon,
        )
        change_blocks(image, rng, 8)  # 512 KiB: more than the log's bound
        await vm.cycle()  # overflows; outside the window: nothing is sent
        assert overflowed(vm)
        assert vm.state.health == "critical"
        assert site.replica_image(vmid, 0).read_bytes() != image.read_bytes()
        vm.wall_clock = lambda: datetime(2026, 11, 24, 23, 0)  # the window opens
        await vm.cycle()
    assert not overflowed(vm)
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


def overflowed(vm: VMReplicator) -> bool:
    """(A call, so that the type checker does not carry one assert's narrowing on.)"""
    return vm.pending.overflowed


def write_blocks(path: Path, rng: random.Random, blocks: set[int], tracker: ChangeTracker) -> None:
    """Overwrite ``blocks`` (the last one cut at the disk's end) and report each write,
    as the embedding tool would."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        for b in blocks:
            length = min(BLOCK, size - b * BLOCK)
            f.seek(b * BLOCK)
            f.write(rng.randbytes(length))
            tracker.report_write(0, b * BLOCK, length)


def count_digest_requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every DigestMapRequest the primary sends from now on, one entry per disk index."""
    asked: list[int] = []
    real = RecoveryClient.digest_map

    async def counted(client: RecoveryClient, vmid: uuid.UUID, disk_index: int, *a: int) -> object:
        asked.append(disk_index)
        return await real(client, vmid, disk_index, *a)

    monkeypatch.setattr(RecoveryClient, "digest_map", counted)
    return asked


def is_lost(tracker: ChangeTracker) -> bool:
    """(A call, as overflowed() below.)"""
    return tracker.lost


def last_resync(vm: VMReplicator) -> ResyncResult:
    assert vm.last_resync is not None
    return vm.last_resync


async def test_an_overflow_with_a_surviving_bitmap_sends_the_dirty_blocks(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, first = one_vm(site, server, 25, 8 * MIB)
    size = image.stat().st_size
    with trio.fail_after(60):
        await first.cycle()  # IR
        tracker = ChangeTracker([size], BLOCK)
        vm = site.restarted(first, pending_bytes=256 * 1024, tracker=tracker)
        last = size // BLOCK  # cut short: the image is not a whole number of blocks
        written = {last, *rng.sample(range(last), 16)}  # about 1 MiB: past the bound
        write_blocks(image, rng, written, tracker)
        asked = count_digest_requests(monkeypatch)
        await vm.cycle()  # the capture overflows; the cycle resynchronizes
        result = last_resync(vm)
        assert result.method == "dirty-bitmap"
        assert (result.blocks, result.blocks_sent) == (0, len(written))
        assert result.bytes_sent == (len(written) - 1) * BLOCK + size - last * BLOCK
        assert result.to_json()["method"] == "dirty-bitmap"
        assert asked == []  # no digest map requested, no scan compared
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        assert not vm.pending.overflowed
        assert vm.pending.cycles() == []
        assert tracker.dirty_count() == 0
        assert vm.state.sequence == 1
        assert vm.state.health != "critical"
        # The digest maps describe the replica: verification agrees, and deltas go on.
        assert (await vm.verify()).ok
        write_blocks(image, rng, {3, 4}, tracker)
        await vm.cycle()
    assert vm.state.sequence == 2
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_a_bitmap_resync_sends_the_pending_cycles_and_the_dirty_blocks(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, first = one_vm(site, server, 26, 8 * MIB)
    size = image.stat().st_size
    with trio.fail_after(60):
        await first.cycle()  # IR
        tracker = ChangeTracker([size], BLOCK)
        # Room for one cycle of 3 blocks, not for a second one of 8.
        bound = CYCLE_OVERHEAD + 5 * (RECORD_OVERHEAD + BLOCK)
        vm = site.restarted(first, pending_bytes=bound, tracker=tracker)
        blocks = rng.sample(range(size // BLOCK), 10)
        early, late = set(blocks[:3]), set(blocks[2:])  # one block in both
        write_blocks(image, rng, early, tracker)
        await vm.capture()  # captured, not sent (as when the server is unreachable)
        assert [c.chunk_count for c in vm.pending.cycles()] == [3]
        write_blocks(image, rng, late, tracker)
        asked = count_digest_requests(monkeypatch)
        await vm.cycle()  # the second capture overflows; the cycle resynchronizes
        result = last_resync(vm)
        assert result.method == "dirty-bitmap"
        assert result.blocks_sent == len(early | late) == 10  # the log's and the bitmap's
        assert asked == []
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        assert not vm.pending.overflowed
        assert vm.pending.cycles() == []
        assert vm.state.sequence == 1  # the pending cycle's number, never sent, was reused
        assert (await vm.verify()).ok


async def test_a_damaged_pending_log_falls_back_to_digests(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, first = one_vm(site, server, 27, 8 * MIB)
    size = image.stat().st_size
    with trio.fail_after(60):
        await first.cycle()  # IR
        tracker = ChangeTracker([size], BLOCK)
        bound = CYCLE_OVERHEAD + 5 * (RECORD_OVERHEAD + BLOCK)
        vm = site.restarted(first, pending_bytes=bound, tracker=tracker)
        blocks = rng.sample(range(size // BLOCK), 11)
        early, late = set(blocks[:3]), set(blocks[3:])
        write_blocks(image, rng, early, tracker)
        await vm.capture()
        (pending,) = vm.pending.cycles()
        path = vm.pending.path_of(pending.sequence)
        raw = bytearray(path.read_bytes())
        raw[32 + 5] ^= 1  # the first record's length: its blocks can no longer be told
        path.write_bytes(raw)
        write_blocks(image, rng, late, tracker)
        asked = count_digest_requests(monkeypatch)
        await vm.cycle()  # overflows; the log cannot be trusted: digests decide
        result = last_resync(vm)
        assert result.method == "digests"
        assert result.blocks == -(-size // BLOCK)
        assert result.blocks_sent == len(early | late)
        assert asked  # the replica's digests were asked for
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        assert not vm.pending.overflowed
        assert vm.pending.cycles() == []
        assert tracker.dirty_count() == 0
        assert (await vm.verify()).ok


async def test_a_lost_tracker_resyncs_by_digests_by_itself(
    site: Site, server: ServerProcess, tmp_path: Path
) -> None:
    rng, vmid, image, first = one_vm(site, server, 28, 8 * MIB)
    size = image.stat().st_size
    first.tracker = ChangeTracker([size], BLOCK)
    with trio.fail_after(60):
        await first.cycle()  # IR
        # The tool restarts without its bitmap; the disk was written meanwhile and nobody
        # reported it.
        changed = change_blocks(image, rng, 13)
        tracker = ChangeTracker.load_or_lost(tmp_path / "no-bitmap", [size], BLOCK)
        assert is_lost(tracker)
        vm = site.restarted(first, tracker=tracker)
        await vm.cycle()  # a plain cycle: it does not trust the lost tracker
        result = last_resync(vm)
        assert result.method == "digests"
        assert result.blocks_sent == len(changed)
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        assert not is_lost(tracker)
        assert vm.state.sequence == 1
        # Trusted again: the next write goes as an ordinary delta.
        vm.last_resync = None
        write_blocks(image, rng, {5}, tracker)
        await vm.cycle()
    assert vm.last_resync is None
    assert vm.state.sequence == 2
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_failed_captures_and_resyncs_give_the_blocks_back(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, first = one_vm(site, server, 29, 4 * MIB)
    size = image.stat().st_size
    with trio.fail_after(60):
        await first.cycle()  # IR
        tracker = ChangeTracker([size], BLOCK)
        vm = site.restarted(first, tracker=tracker)
        written = set(rng.sample(range(size // BLOCK), 6))
        write_blocks(image, rng, written, tracker)

        def disk_full(*args: object) -> int:
            raise OSError("no space left on the device")

        with monkeypatch.context() as m:
            m.setattr(vm.pending, "append_cycle", disk_full)
            with pytest.raises(OSError, match="no space"):
                await vm.capture()
        assert tracker.dirty_blocks() == {0: sorted(written)}
        assert vm.pending.cycles() == []

        async def link_down(*args: object, **kwargs: object) -> None:
            raise OSError("the link went down")

        vm.pending.max_bytes = 64 * 1024  # the next capture overflows
        with monkeypatch.context() as m:
            m.setattr(RecoveryClient, "send_batch", link_down)
            with pytest.raises(OSError, match="link went down"):
                await vm.cycle()
        assert overflowed(vm)
        assert tracker.dirty_blocks() == {0: sorted(written)}
        await vm.cycle()  # the next try still knows every block
    assert last_resync(vm).method == "dirty-bitmap"
    assert last_resync(vm).blocks_sent == len(written)
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()

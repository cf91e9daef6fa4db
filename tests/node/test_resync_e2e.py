"""Online verification and resynchronization by digests, against a real recovery server
process: verification finds a block corrupted on purpose and nothing otherwise; a
resynchronization after lost change tracking, or an overflowed pending log, sends about
only the blocks that changed."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import trio

from node.primary.replicator import VMReplicator
from node.primary.tracker import ChangeTracker
from node.testing import ServerProcess

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


async def test_verification_finds_a_corrupted_block_and_nothing_otherwise(
    site: Site, server: ServerProcess
) -> None:
    rng = random.Random(21)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 4 * MIB, rng)
    vm = site.replicator(vmid, "vm", [image], server.port)
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
    rng = random.Random(22)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 8 * MIB, rng)
    size = image.stat().st_size
    vm = site.replicator(vmid, "vm", [image], server.port)
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
    rng = random.Random(23)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 8 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
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

    rng = random.Random(24)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 4 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
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

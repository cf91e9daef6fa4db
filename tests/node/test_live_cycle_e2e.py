"""A cycle sent while it is captured (issue 16, ``node/primary/live_cycle.py``): the
batch begins, and its first chunks go, before the capture is over; a capture that fails
mid-stream leaves the replica as it was (no BatchEnd: REP-17) and loses nothing."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

import node.primary.delta
from frtesting.server import ServerProcess
from node.primary.replicator import VMReplicator
from node.primary.scan import read_blocks
from node.primary.tracker import ChangeTracker

from .site import Site
from .test_replication_e2e import MIB, server
from .test_resync_e2e import BLOCK, change_blocks, one_vm

__all__ = ["server"]  # the fixture, shared with the replication tests

#: How long the capture's reader waits for the batch to begin (far above any connect).
WAIT = 20.0


def _halting_reads(
    monkeypatch: pytest.MonkeyPatch, vm: VMReplicator, *, fail: bool
) -> threading.Event:
    """The capture reads half its blocks, then waits until the session has sent the
    BatchBegin (so the batch demonstrably began before the capture was over) and reads
    on, or with ``fail`` fails as a disk would. The returned event is set once the wait
    saw the batch begun."""
    begun = threading.Event()

    def reads(
        image: Path, block_size: int, blocks: Sequence[int], size: int
    ) -> Iterator[tuple[int, int, memoryview]]:
        half = max(1, len(blocks) // 2)
        for i, item in enumerate(read_blocks(image, block_size, blocks, size)):
            if i == half:
                waited = 0.0
                while "batch_begin" not in vm.phases and waited < WAIT:
                    threading.Event().wait(0.01)
                    waited += 0.01
                if "batch_begin" in vm.phases:
                    begun.set()
                if fail:
                    raise OSError(errno.EIO, "injected read error", str(image))
            yield item

    monkeypatch.setattr(node.primary.delta, "read_blocks", reads)
    return begun


async def test_the_batch_begins_before_the_capture_is_over(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, vm = one_vm(site, server, 41, 4 * MIB)
    vm.tracker = ChangeTracker([image.stat().st_size], BLOCK)
    with trio.fail_after(90):
        await vm.cycle()  # IR
        after_ir = vm.state.sequence
        for b in change_blocks(image, rng, 16):
            vm.tracker.report_write(0, b * BLOCK, BLOCK)
        begun = _halting_reads(monkeypatch, vm, fail=False)
        await vm.cycle()
    assert begun.is_set(), "the batch did not begin while the capture was under way"
    assert vm.phases["batch_begin"] < vm.phases["captured"] < vm.phases["acked"]
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert vm.pending.cycles() == []
    assert vm.state.sequence == after_ir + 1


async def test_a_capture_that_fails_mid_stream_applies_nothing_and_loses_nothing(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng, vmid, image, vm = one_vm(site, server, 42, 4 * MIB)
    vm.tracker = ChangeTracker([image.stat().st_size], BLOCK)
    with trio.fail_after(90):
        await vm.cycle()  # IR
        after_ir = vm.state.sequence
        before = site.replica_image(vmid, 0).read_bytes()
        changed = change_blocks(image, rng, 16)
        for b in changed:
            vm.tracker.report_write(0, b * BLOCK, BLOCK)
        begun = _halting_reads(monkeypatch, vm, fail=True)
        with pytest.raises(OSError, match="injected read error"):
            await vm.cycle()
        assert begun.is_set()  # the batch had begun, chunks were on their way
        # Nothing of the unended batch reached the replica; nothing stayed in the log;
        # the blocks are dirty again.
        assert site.replica_image(vmid, 0).read_bytes() == before
        assert vm.pending.cycles() == []
        assert set(vm.tracker.dirty_blocks()[0]) == changed
        assert vm.state.sequence == after_ir
        monkeypatch.undo()
        await vm.cycle()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert vm.state.sequence == after_ir + 1
    assert vm.pending.cycles() == []


async def test_a_session_that_fails_leaves_the_captured_cycle_for_the_next(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is gone while the cycle is captured: the capture finishes all the
    same (it never waits for the session), the cycle is kept, the next cycle sends it."""
    rng, vmid, image, vm = one_vm(site, server, 43, 2 * MIB)
    vm.tracker = ChangeTracker([image.stat().st_size], BLOCK)
    with trio.fail_after(90):
        await vm.cycle()  # IR
        for b in change_blocks(image, rng, 8):
            vm.tracker.report_write(0, b * BLOCK, BLOCK)
        port = vm.state.recovery_port
        vm.state.recovery_port = 1  # nothing listens there: the connect fails
        with pytest.raises(OSError, match="Connection refused"):
            await vm.cycle()
        (pending,) = vm.pending.cycles()
        assert pending.chunk_count == 8
        vm.state.recovery_port = port
        await vm.cycle()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert vm.pending.cycles() == []
    assert vm.state.sequence == pending.sequence

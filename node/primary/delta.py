"""The delta cycles of one VM: captured into the pending log, then sent as batches.

**Capture.** The changed blocks come from the attached :class:`ChangeTracker` (the
embedding hypervisor tool reports written ranges) or, with no tracker, from a scan that
compares each block's XXH3 digest with the digest map of the last replicated state
(:func:`~node.primary.plan.plan_capture` says which). Their data is copied into the
on-disk :class:`PendingLog` as one cycle, between the ``before_capture`` /
``after_capture`` hooks: the disks must not change in that window.

**Send.** A pending cycle goes as one delta batch, streamed from the log; only after the
server's ack is its sequence recorded and its data dropped from the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
import xxhash

import frproto as fp

from .client import BatchChunk, RecoveryClient
from .pending_log import LogChunk, PendingCycle, PendingLog, PendingLogFull
from .plan import Capture, next_capture_sequence, plan_capture
from .record import VMRecord, count_batch
from .scan import read_blocks, scan_changes
from .tracker import ChangeTracker

if TYPE_CHECKING:
    from .qemu import PointInTime

log = logging.getLogger("frrep.primary")


@dataclass(frozen=True)
class Deltas:
    """Captures and sends one VM's delta cycles.

    Attributes:
        vm: the VM (its digest maps describe what was captured).
        pending: its pending log.
        tracker: the embedding tool's change tracker; None: scan for changes.
        before_capture / after_capture: hooks around the capture window.
        chunk_fault: test seam, transforms a chunk's data after its digest was taken.
        phases: where the capture and the send note when they passed their steps
            (``captured``, ``batch_begin``, ``acked``; ``time.time()``), if anywhere.
    """

    vm: VMRecord
    pending: PendingLog
    tracker: ChangeTracker | None
    before_capture: Callable[[], None] | None
    after_capture: Callable[[], None] | None
    chunk_fault: Callable[[bytes], bytes] | None = None
    phases: dict[str, float] | None = None
    #: QEMU's point in time of this cycle (``node/primary/qemu``): its frozen dirty
    #: bitmaps say what changed, and the images are read through its views.
    point: PointInTime | None = None
    #: The capture time to stamp the cycle with (ms since the epoch), for a group
    #: capture (``node/primary/group_capture.py``): every VM of the group carries the
    #: same one, and a cycle is captured even when nothing changed, so that each VM has
    #: a recovery point of that moment. None: now, and nothing captured when unchanged.
    captured_at_ms: int | None = None

    def _note(self, phase: str) -> None:
        if self.phases is not None:
            self.phases[phase] = time.time()

    async def capture(self) -> None:
        """Copy this cycle's changed blocks into the pending log (one consistent point)."""
        source = plan_capture(
            overflowed=self.pending.overflowed,
            has_tracker=self.tracker is not None or self.point is not None,
        )
        if source is Capture.NOTHING:
            return  # the cycle resynchronizes instead
        if self.before_capture is not None:
            self.before_capture()
        try:
            changed, known = await trio.to_thread.run_sync(self._changed_blocks, source)
            if not any(changed.values()) and self.captured_at_ms is None:
                return
            captured = await self._append(changed, known)
            if captured is None:
                return
            # The maps now describe what was *captured* (durable in the pending log), so
            # the next scan finds only what changed since, not this cycle again.
            for disk_index, b, digest in captured:
                self.vm.maps[disk_index].set(b, digest)
            self.vm.save_maps(list({d for d, _, _ in captured}))
        finally:
            if self.after_capture is not None:
                self.after_capture()
        self.vm.save()
        self._note("captured")

    async def _append(
        self, changed: dict[int, list[int]], known: dict[tuple[int, int], bytes]
    ) -> list[tuple[int, int, bytes]] | None:
        """Append the ``changed`` blocks as a new pending cycle: ``(disk, block, digest)``
        of each, or None when the log passed its bound. ``known``: digests the scan took
        of these blocks within the same capture window (the disks did not change since),
        used instead of digesting the blocks again."""
        block = self.vm.state.block_size
        disks, images = self.vm.disks, self.vm.images
        captured: list[tuple[int, int, bytes]] = []

        def chunks() -> Iterator[LogChunk]:
            for disk_index, blocks in sorted(changed.items()):
                size = disks[disk_index].size
                for b, offset, data in read_blocks(images[disk_index], block, blocks, size):
                    # The one digest of this block: the digest map, the pending log's
                    # record and the chunk header all carry this one.
                    digest = known.get((disk_index, b)) or xxhash.xxh3_128_digest(data)
                    captured.append((disk_index, b, digest))
                    yield disk_index, offset, data, digest

        try:
            sequences = [c.sequence for c in self.pending.cycles()]
            sequence = next_capture_sequence(sequences, self.vm.state.sequence)
            await trio.to_thread.run_sync(
                self.pending.append_cycle,
                sequence,
                int(time.time() * 1000) if self.captured_at_ms is None else self.captured_at_ms,
                chunks(),
            )
        except PendingLogFull:
            # The tracker must keep these blocks: with the log overflowed, the
            # resynchronization trusts the tracker's dirty set plus the log's cycles
            # as the whole of what changed.
            self.give_back(changed)
            log.warning(
                "%s: the pending log passed its bound (%d bytes): the next step is a "
                "resynchronization",
                self.vm.name,
                self.pending.max_bytes,
            )
            return None
        except BaseException:
            # Nothing of this cycle was kept: its blocks are dirty again for the next.
            self.give_back(changed)
            raise
        return captured

    def give_back(self, taken: dict[int, list[int]]) -> None:
        """Blocks taken from the tracker that were not captured or sent: dirty again."""
        if self.point is not None:
            # QEMU's frozen bitmaps are merged back when the point closes uncommitted.
            self.point.captured = False
        if self.tracker is not None and taken:
            self.tracker.restore(taken)

    def _changed_blocks(
        self, source: Capture
    ) -> tuple[dict[int, list[int]], dict[tuple[int, int], bytes]]:
        """The changed blocks per disk, and the digests a scan took of them (keyed by
        ``(disk, block)``; none from a tracker or from QEMU's bitmaps)."""
        if self.point is not None:
            dirty = self.point.dirty_blocks(self.vm.state.block_size)
            self.point.captured = True  # until give_back: commit the bitmaps at close
            return dirty, {}
        if source is Capture.FROM_TRACKER:
            assert self.tracker is not None
            return self.tracker.take(), {}
        changed: dict[int, list[int]] = {}
        known: dict[tuple[int, int], bytes] = {}
        for disk_index, path in enumerate(self.vm.images):
            blocks, digests = scan_changes(path, self.vm.maps[disk_index])
            if blocks:
                changed[disk_index] = blocks
                known.update(((disk_index, b), d) for b, d in digests.items())
        return changed, known

    async def send(self, client: RecoveryClient, pending: PendingCycle) -> None:
        """Send one pending cycle as its delta batch; once acknowledged, record it and
        drop it from the pending log."""
        sequence = pending.sequence
        fault = self.chunk_fault

        def chunks() -> Iterator[BatchChunk]:
            # Streamed from the pending log: a large cycle never sits in memory whole. The
            # digest is the capture's (digest once): the server's check is the only one.
            for disk_index, offset, data, digest in self.pending.read_chunks(sequence):
                yield disk_index, offset, data if fault is None else fault(bytes(data)), digest

        total = pending.nbytes
        self._note("batch_begin")
        try:
            await client.send_batch(
                self.vm.vmid,
                sequence,
                chunks(),
                chunk_count=pending.chunk_count,
                total_bytes=total,
                captured_at_ms=pending.captured_at_ms,
                limiter=self.vm.limiter(),
            )
        except fp.DigestMismatch:
            # Damaged in flight, or in the pending log since the capture (its data is not
            # digested again on the way out): the log's own check tells them apart, and
            # a damaged log raises PendingLogCorrupt (a resynchronization, not a loop of
            # refused resends).
            await trio.to_thread.run_sync(self.pending.check_cycle, sequence)
            raise
        self._note("acked")
        # The acknowledged sequence is recorded *before* the cycle leaves the pending log:
        # killed in between, the primary finds a cycle it already had acknowledged (it is
        # dropped unsent, see plan_pending_cycle). The other order could let a restarted
        # primary number new changes with a sequence the replica already applied, and the
        # replica would acknowledge them without applying them.
        s = self.vm.state
        s.sequence = sequence
        s.last_replicated_at = time.time()
        s.last_captured_at = pending.captured_at_ms / 1000
        count_batch(s, total)
        self.vm.save()
        self.pending.drop_through(sequence)
        self.vm.save()
        log.info(
            "%s: batch %d applied (%d chunks, %d bytes)",
            s.name,
            sequence,
            pending.chunk_count,
            total,
        )

"""Resynchronization: bringing the replica level with the disks in one delta batch.

(Online verification, the comparison without sending, is ``node/primary/verify.py``;
its results are importable from here too.) A resynchronization by digests asks the
recovery server for the replica's block digests; no disk data crosses for the comparison.

A resynchronization is for when the pending log passed its bound or change tracking
  was lost (a crash without its state, disks changed while replication was off). It
  first uses what is known, then digests:

  1. **From the dirty bitmap** (``method == "dirty-bitmap"``): the pending log overflowed
     but the embedding tool's change tracker survived (not *lost*) and no
     resynchronization by digests was asked for (``needs_resync``). The blocks changed
     since the last acknowledged batch are then known exactly: those of the cycles still
     in the pending log plus the tracker's dirty ones. Only they are read (and digested
     once), and sent as one delta batch; the replica's digests are not fetched and the
     disks are not scanned. The pending log is walked by its record headers only
     (:meth:`PendingLog.extents`); anything wrong there and the digests decide instead.
  2. **By digests** (``method == "digests"``): in every other case (no tracker, a lost
     one, ``needs_resync``, a pending log that cannot be trusted, a replica behind the
     acknowledged sequence, or when asked). The primary reads its images, digests every
     block and sends only the blocks whose digest differs from the replica's.

  Either way it is one ordinary delta batch, no full IR, and the digest maps then
describe what the replica holds. *What* is sent is decided in ``node/primary/plan.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio
import xxhash

from .client import BatchChunk, RecoveryClient
from .digest_map import DigestMap
from .disks import check_disks
from .pending_log import PendingLog, PendingLogCorrupt
from .plan import (
    ResyncByDigests,
    ResyncKnown,
    bitmap_survived,
    known_blocks,
    next_resync_sequence,
    plan_resync,
    with_dirty,
)
from .record import VMRecord, count_batch
from .scan import read_blocks
from .tracker import ChangeTracker
from .verify import (
    Difference,
    OpenExisting,
    VerifyResult,
    coalesce,
    describe,
    differing_blocks,
    disks_and_replica,
    pending_blocks,
    replica_map,
)

__all__ = [
    "BY_DIGESTS",
    "FROM_DIRTY_BITMAP",
    "Difference",
    "Progress",
    "ResyncResult",
    "Resynchronization",
    "VerifyResult",
    "coalesce",
    "describe",
    "differing_blocks",
    "pending_blocks",
    "replica_map",
]

log = logging.getLogger("frrep.primary")


#: :attr:`ResyncResult.method` of a resynchronization from the pending log and a
#: surviving dirty bitmap.
FROM_DIRTY_BITMAP = "dirty-bitmap"
#: :attr:`ResyncResult.method` of a resynchronization that compared digests.
BY_DIGESTS = "digests"


@dataclass
class ResyncResult:
    """What a resynchronization sent."""

    vmid: str
    sequence: int  #: the batch that carried the differences (0: nothing differed)
    blocks: int = 0  #: blocks compared by digest (0 from the dirty bitmap: none compared)
    blocks_sent: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    method: str = BY_DIGESTS  #: :data:`FROM_DIRTY_BITMAP` or :data:`BY_DIGESTS`
    #: By digests: seconds until the differences were known (the replica's maps fetched
    #: and the disks digested, overlapped); the rest of :attr:`seconds` is the batch.
    compare_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "vmid": self.vmid,
            "method": self.method,
            "sequence": self.sequence,
            "blocks": self.blocks,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "seconds": round(self.seconds, 3),
        }


#: ``progress(bytes_done, bytes_total)`` while images are read.
Progress = Callable[[int, int], None]


# -- carrying it out ---------------------------------------------------------------------


@dataclass(frozen=True)
class Resynchronization:
    """Resynchronizes one VM's replica.

    Attributes:
        vm: the VM (its digest maps are what was captured and acknowledged).
        pending: its pending log.
        tracker: the embedding tool's change tracker, if any.
        before_capture / after_capture: hooks around the window the disks are read in.
        open_existing: opens the relationship where the replica lives.
    """

    vm: VMRecord
    pending: PendingLog
    tracker: ChangeTracker | None
    before_capture: Callable[[], None] | None
    after_capture: Callable[[], None] | None
    open_existing: OpenExisting

    async def run(self, progress: Progress | None, *, by_digests: bool) -> ResyncResult:
        """Bring the replica level with the disks in one delta batch (see
        ``VMReplicator.resync``); the digest maps then describe the replica."""
        s = self.vm.state
        check_disks(s.disks, s.vmid)
        started = time.monotonic()
        known: dict[int, set[int]] | None = None
        if not by_digests and self._bitmap_survived():
            known = await trio.to_thread.run_sync(self._pending_blocks)
        client, accepted = await self.open_existing()
        # The disks are read from here on, under the capture hooks: the batch's point.
        point = time.time()
        taken: dict[int, list[int]] = {}
        try:
            try:
                how = plan_resync(
                    known, applied_sequence=accepted.applied_sequence, acknowledged=s.sequence
                )
                if isinstance(how, ResyncByDigests) and how.replica_behind:
                    log.warning(
                        "%s: the replica is at sequence %d, behind the acknowledged %d: "
                        "resynchronizing by digests",
                        s.name,
                        accepted.applied_sequence,
                        s.sequence,
                    )
                sequence = next_resync_sequence(accepted.applied_sequence, s.sequence)
                result = await self._send(client, sequence, how, progress, taken)
            finally:
                await client.aclose()
            s.sequence = max(s.sequence, accepted.applied_sequence, result.sequence)
            s.last_replicated_at = time.time()
            if result.sequence:
                s.last_captured_at = point
                count_batch(s, result.bytes_sent)
            self.vm.save()
        except BaseException:
            # Perhaps not applied, perhaps not recorded: sending them again is harmless,
            # and a later resynchronization from the bitmap must not miss them.
            if self.tracker is not None and taken:
                self.tracker.restore(taken)
            raise
        self.pending.clear()
        self.pending.clear_overflow()
        s.needs_resync = False
        if result.method == BY_DIGESTS and self.tracker is not None:
            self.tracker.clear_lost()  # the comparison covered what it had missed
        self.vm.save()
        result.seconds = time.monotonic() - started
        _log_result(s.name, result)
        return result

    async def _send(
        self,
        client: RecoveryClient,
        sequence: int,
        how: ResyncKnown | ResyncByDigests,
        progress: Progress | None,
        taken: dict[int, list[int]],
    ) -> ResyncResult:
        """Send what differs as batch ``sequence``, the disks held still by the capture
        hooks; ``taken`` receives the tracker's dirty blocks. Then the maps describe
        what the replica holds, updated where we sent."""
        if self.before_capture is not None:
            self.before_capture()
        try:
            if self.tracker is not None:
                # By digests, the comparison covers these blocks; from the bitmap, they
                # are part of what is sent.
                taken.update(self.tracker.take())
            if isinstance(how, ResyncByDigests):
                result, maps, sent = await self._send_differing(client, sequence, progress)
                touched: list[int] = list(range(len(maps)))
            else:
                known = with_dirty(how.blocks, taken)
                result, sent = await self._send_known(client, sequence, known, progress)
                maps, touched = self.vm.maps, sorted(sent)
        finally:
            if self.after_capture is not None:
                self.after_capture()
        # From the bitmap, the blocks not sent were captured and acknowledged unchanged
        # since (else they would be in the log or the tracker), so their maps stand.
        for index in touched:
            dmap = maps[index]
            for b, digest in sent.get(index, {}).items():
                dmap.set(b, digest)
            dmap.save(self.vm.map_path(index))
        self.vm.maps[:] = maps
        return result

    def _bitmap_survived(self) -> bool:
        s = self.vm.state
        return bitmap_survived(
            overflowed=self.pending.overflowed,
            has_tracker=self.tracker is not None,
            tracker_lost=self.tracker is not None and self.tracker.lost,
            needs_resync=s.needs_resync,
            maps_on_disk=all(self.vm.map_path(i).exists() for i in range(len(s.disks))),
        )

    def _pending_blocks(self) -> dict[int, set[int]] | None:
        """The blocks of every cycle in the pending log, from its record headers; None when
        the log cannot be trusted (only digests can tell what changed then)."""
        sizes = [d.size for d in self.vm.disks]
        try:
            extents = (
                (cycle.sequence, self.pending.extents(cycle.sequence))
                for cycle in self.pending.cycles()
            )
            return known_blocks(extents, sizes, self.vm.state.block_size)
        except (PendingLogCorrupt, KeyError, OSError) as exc:
            log.warning(
                "%s: the pending log cannot be trusted (%s): resynchronizing by digests",
                self.vm.name,
                exc,
            )
            return None

    async def _send_known(
        self,
        client: RecoveryClient,
        sequence: int,
        known: dict[int, set[int]],
        progress: Progress | None,
    ) -> tuple[ResyncResult, dict[int, dict[int, bytes]]]:
        """Send the ``known`` blocks (``{disk: blocks}``) as batch ``sequence``: the result
        and, once acknowledged, ``{disk: {block: digest}}`` of what was sent."""
        block = self.vm.state.block_size
        sizes = [d.size for d in self.vm.disks]
        images = self.vm.images
        wanted = {index: sorted(blocks) for index, blocks in known.items() if blocks}
        result = ResyncResult(self.vm.state.vmid, 0, method=FROM_DIRTY_BITMAP)
        result.blocks_sent = sum(len(blocks) for blocks in wanted.values())
        total = sum(
            min(block, sizes[index] - b * block) for index, blocks in wanted.items() for b in blocks
        )
        sent: dict[int, dict[int, bytes]] = {}
        if not result.blocks_sent:
            return result, sent

        def chunks() -> Iterator[BatchChunk]:
            for index, blocks in sorted(wanted.items()):
                digests = sent.setdefault(index, {})
                for b, offset, data in read_blocks(images[index], block, blocks, sizes[index]):
                    # Digested as read: the map records exactly the bytes that crossed.
                    digest = xxhash.xxh3_128_digest(data)
                    digests[b] = digest
                    result.bytes_sent += len(data)
                    if progress is not None:
                        progress(result.bytes_sent, total)
                    yield index, offset, data, digest

        await client.send_batch(
            self.vm.vmid,
            sequence,
            chunks(),
            chunk_count=result.blocks_sent,
            total_bytes=total,
            captured_at_ms=int(time.time() * 1000),
            limiter=self.vm.limiter(),
        )
        result.sequence = sequence
        return result, sent

    async def _send_differing(
        self, client: RecoveryClient, sequence: int, progress: Progress | None
    ) -> tuple[ResyncResult, list[DigestMap], dict[int, dict[int, bytes]]]:
        """Compare every block with the replica's digests and send those that differ as
        batch ``sequence``: the result, the replica's maps as fetched, and ``{disk:
        {block: digest}}`` of what was sent."""
        block = self.vm.state.block_size
        disks, images, vmid = self.vm.disks, self.vm.images, self.vm.vmid
        started = time.monotonic()
        ours, theirs = await disks_and_replica(client, self.vm, progress)
        changed: dict[int, dict[int, bytes]] = {}
        for index, (mine, replica) in enumerate(zip(ours, theirs, strict=True)):
            changed[index] = {b: mine.get(b) for b in differing_blocks(mine, replica)}
        result = ResyncResult(self.vm.state.vmid, 0, method=BY_DIGESTS)
        result.compare_seconds = time.monotonic() - started
        result.blocks = sum(m.block_count for m in theirs)
        result.blocks_sent = sum(len(c) for c in changed.values())
        if not result.blocks_sent:
            return result, theirs, changed

        def chunks() -> Iterator[BatchChunk]:
            for index, blocks in sorted(changed.items()):
                size = disks[index].size
                for b, offset, data in read_blocks(images[index], block, sorted(blocks), size):
                    result.bytes_sent += len(data)
                    # Digested once, by the scan: if the disk changed since (outside the
                    # capture window), the server refuses the chunk instead of the map
                    # believing it.
                    yield index, offset, data, blocks[b]

        await client.send_batch(
            vmid,
            sequence,
            chunks(),
            chunk_count=result.blocks_sent,
            total_bytes=sum(
                min(block, disks[i].size - b * block)
                for i, blocks in changed.items()
                for b in blocks
            ),
            captured_at_ms=int(time.time() * 1000),
            limiter=self.vm.limiter(),
        )
        result.sequence = sequence
        return result, theirs, changed


def _log_result(name: str, result: ResyncResult) -> None:
    if result.method == BY_DIGESTS:
        log.info(
            "%s: resynchronized by digests: %d of %d blocks differed (%d bytes sent)",
            name,
            result.blocks_sent,
            result.blocks,
            result.bytes_sent,
        )
    else:
        log.info(
            "%s: resynchronized from the dirty bitmap: %d blocks (%d bytes) sent",
            name,
            result.blocks_sent,
            result.bytes_sent,
        )

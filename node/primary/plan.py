"""What a replication cycle sends, decided from what the primary knows (pure logic, no I/O).

The replicator (``node/primary/replicator.py``) and its rooms gather the facts (the VM's
state, what the pending log holds, whether the change tracker survived, whether the
digest maps are on disk, what the recovery server answered to the relationship's open),
call these functions and carry out the typed decisions they return. Nothing here reads a
file, the clock or the network, so each decision is tested from plain values
(``tests/node/primary/test_plan.py``).

One cycle, in the order the replicator asks:

1. :func:`plan_cycle`: an initial replication still to do, a capture of new changes, or
   a resynchronization by digests (asked by the state, or a lost tracker).
2. :func:`plan_capture`: the new delta comes from the tracker's dirty blocks, from a
   scan against the digest maps, or not at all (the pending log overflowed).
3. :func:`resync_due`: whether the cycle resynchronizes before it sends.
4. On the relationship's open: :func:`refusal` (a replica that cannot take batches),
   :func:`plan_ir` (an IR from a cursor, or the out-of-band one), and for every pending
   cycle :func:`plan_pending_cycle` (resend it, or drop it as already acknowledged).

A resynchronization asks :func:`bitmap_survived`, reads the pending log's extents through
:func:`known_blocks`, and :func:`plan_resync` picks the known blocks or the digests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import frproto as fp

from .pending_log import PendingLogCorrupt
from .state import IRStage

# -- the cycle -------------------------------------------------------------------------


class CycleStart(Enum):
    """What a cycle does before it connects."""

    #: The IR is not complete: nothing is captured, the session sends the IR.
    INITIAL_REPLICATION = "initial replication"
    #: Capture the changes since the last cycle into the pending log.
    CAPTURE = "capture"
    #: Resynchronize by digests instead of capturing.
    RESYNC = "resync"


def plan_cycle(*, ir_stage: IRStage, needs_resync: bool, tracker_lost: bool) -> CycleStart:
    """How a cycle starts. ``tracker_lost``: a tracker is attached and it is lost."""
    if ir_stage != IRStage.COMPLETE:
        return CycleStart.INITIAL_REPLICATION
    # A lost tracker's dirty set is incomplete: capturing from it would replicate some
    # writes and silently miss others.
    if needs_resync or tracker_lost:
        return CycleStart.RESYNC
    return CycleStart.CAPTURE


def resync_due(start: CycleStart, *, overflowed: bool) -> bool:
    """Whether the cycle resynchronizes (after its capture, if any) before it sends."""
    if start is CycleStart.INITIAL_REPLICATION:
        return False
    return start is CycleStart.RESYNC or overflowed


# -- capture ---------------------------------------------------------------------------


class Capture(Enum):
    """Where a capture takes the changed blocks from."""

    #: Nothing is captured: the pending log overflowed, the cycle resynchronizes instead.
    NOTHING = "nothing"
    #: The change tracker's dirty blocks (the embedding tool reported the writes).
    FROM_TRACKER = "tracker"
    #: A scan: every block's digest compared with the digest map.
    SCAN = "scan"


def plan_capture(*, overflowed: bool, has_tracker: bool) -> Capture:
    """Where this capture's changed blocks come from."""
    if overflowed:
        return Capture.NOTHING
    return Capture.FROM_TRACKER if has_tracker else Capture.SCAN


def next_capture_sequence(pending: Sequence[int], acknowledged: int) -> int:
    """The sequence of a newly captured cycle: after every pending and acknowledged one."""
    return max(pending[-1] if pending else 0, acknowledged) + 1


# -- the session -----------------------------------------------------------------------


def refusal(
    *,
    vmid: str,
    replica_sizes: Sequence[int],
    disk_sizes: Sequence[int],
    ir_stage: IRStage,
    applied_sequence: int,
    acknowledged: int,
) -> str | None:
    """Why the replica the server opened cannot take this primary's batches (replication
    then halts for a person), or None."""
    theirs, ours = tuple(replica_sizes), tuple(disk_sizes)
    if theirs != ours:
        return (
            f"the replica's disks are {theirs} bytes, this VM's {ours}: batches would "
            f"not fit; replication halted (`frctl replication reseed {vmid}` "
            f"replicates the VM anew)"
        )
    if ir_stage == IRStage.COMPLETE and applied_sequence < acknowledged:
        return (
            f"the replica is at sequence {applied_sequence}, behind the "
            f"acknowledged {acknowledged}: it needs a resynchronization"
        )
    return None


@dataclass(frozen=True)
class IRFromCursor:
    """Send the IR from ``start`` (disk index, offset); what an earlier, interrupted IR
    sent before it is known from the replica's digests."""

    start: tuple[int, int]
    disk_count: int
    #: The server had the IR in progress: it goes on where the server got to.
    resuming: bool = False

    @property
    def sends(self) -> bool:
        """Whether an IR goes over the wire: data is left to send, or the server holds
        the IR in progress, which only an IREnd completes (one with no chunk, when its
        resume point is the end of the last disk: its last save came after the last
        chunk, before the IREnd)."""
        return self.start[0] < self.disk_count or self.resuming

    @property
    def maps_from_replica(self) -> bool:
        """Whether the digest maps of what was sent before ``start`` come from the replica."""
        return self.start != (0, 0)


@dataclass(frozen=True)
class IRWaitForImport:
    """The IR travels as a file (out of band) and the server has not imported it yet."""


@dataclass(frozen=True)
class IRImported:
    """The out-of-band IR was imported: complete, with the exported digest maps."""


IRDecision = IRFromCursor | IRWaitForImport | IRImported


def plan_ir(
    *, exported: bool, server_ir_state: fp.IRState, resume: tuple[int, int], disk_count: int
) -> IRDecision:
    """How the IR goes on, from what the server said of it on open (``server_ir_state``,
    ``resume``: its disk index and offset) and whether the IR was exported to a file."""
    if exported:
        # The IR travels as a file: never send IR data; wait for the import.
        if server_ir_state is not fp.IRState.COMPLETE:
            return IRWaitForImport()
        return IRImported()
    if server_ir_state is fp.IRState.IN_PROGRESS:
        return IRFromCursor(resume, disk_count, resuming=True)
    if server_ir_state is fp.IRState.COMPLETE:
        # The server completed the IR but we did not record its ack: redo from scratch
        # would be wasteful and wrong; the digest maps come from the replica instead.
        return IRFromCursor((disk_count, 0), disk_count)
    return IRFromCursor((0, 0), disk_count)


@dataclass(frozen=True)
class Resend:
    """Send a pending cycle as its delta batch."""

    sequence: int


@dataclass(frozen=True)
class DropAcknowledged:
    """A pending cycle the server already acknowledged (the primary stopped before it
    dropped it): drop it unsent."""

    sequence: int


def plan_pending_cycle(sequence: int, acknowledged: int) -> Resend | DropAcknowledged:
    """What becomes of one pending cycle at the session's turn to send."""
    if sequence <= acknowledged:
        return DropAcknowledged(sequence)
    return Resend(sequence)


# -- resynchronization -----------------------------------------------------------------


def bitmap_survived(
    *,
    overflowed: bool,
    has_tracker: bool,
    tracker_lost: bool,
    needs_resync: bool,
    maps_on_disk: bool,
) -> bool:
    """Whether the pending log and the tracker together know every block changed since
    the last acknowledged batch (their union is then exact). ``maps_on_disk``: every
    disk's digest map file exists."""
    return (
        overflowed
        and has_tracker
        and not tracker_lost
        and not needs_resync
        # The maps of the blocks not sent are kept as they are: a missing map file was
        # replaced by an empty map on load, which describes nothing.
        and maps_on_disk
    )


def known_blocks(
    extents: Iterable[tuple[int, Iterable[tuple[int, int, int]]]],
    disk_sizes: Sequence[int],
    block_size: int,
) -> dict[int, set[int]]:
    """``{disk: blocks}`` of the pending cycles, from their record headers
    (``(sequence, [(disk_index, offset, length), ...])`` per cycle).

    Raises:
        PendingLogCorrupt: an extent that is not a captured block.
    """
    blocks: dict[int, set[int]] = {}
    for sequence, cycle in extents:
        for disk_index, offset, length in cycle:
            # A capture writes whole blocks at block offsets, the last one cut at the
            # disk's end. Anything else is damage that the record checksums (not read
            # here: they cover the data) would have shown.
            if not (
                0 <= disk_index < len(disk_sizes)
                and offset % block_size == 0
                and offset < disk_sizes[disk_index]
                and length == min(block_size, disk_sizes[disk_index] - offset)
            ):
                raise PendingLogCorrupt(
                    f"cycle {sequence}: a chunk of disk {disk_index} at "
                    f"offset {offset}, {length} bytes, is not a captured block"
                )
            blocks.setdefault(disk_index, set()).add(offset // block_size)
    return blocks


@dataclass(frozen=True)
class ResyncKnown:
    """Send exactly the blocks known changed (pending cycles plus the tracker's dirty
    ones)."""

    blocks: dict[int, set[int]]


@dataclass(frozen=True)
class ResyncByDigests:
    """Compare every block with the replica's digests and send those that differ.
    ``replica_behind``: the known blocks were dropped because the replica lacks
    acknowledged batches."""

    replica_behind: bool = False


def plan_resync(
    known: dict[int, set[int]] | None, *, applied_sequence: int, acknowledged: int
) -> ResyncKnown | ResyncByDigests:
    """How a resynchronization finds what to send, once the server said where the
    replica is (``applied_sequence``). ``known``: the pending cycles' blocks when the
    bitmap survived and the log could be read, else None."""
    if known is None:
        return ResyncByDigests()
    if applied_sequence < acknowledged:
        # The maps assume the replica holds every acknowledged batch; it does not, so
        # only a comparison can tell what it lacks.
        return ResyncByDigests(replica_behind=True)
    return ResyncKnown(known)


def with_dirty(
    known: Mapping[int, set[int]], dirty: Mapping[int, Iterable[int]]
) -> dict[int, set[int]]:
    """The known blocks with the tracker's dirty ones added."""
    out = {index: set(blocks) for index, blocks in known.items()}
    for disk_index, blocks in dirty.items():
        out.setdefault(disk_index, set()).update(blocks)
    return out


def next_resync_sequence(applied_sequence: int, acknowledged: int) -> int:
    """The batch sequence of a resynchronization: after what either side knows of."""
    return max(applied_sequence, acknowledged) + 1

"""Where the primary compares its disks with the replica: online verification and
resynchronization.

Verification, and a resynchronization by digests, ask the recovery server for the
replica's block digests (``DigestMapRequest``, up to ``frproto.MAX_DIGESTS`` blocks per
request); no disk data crosses for the comparison.

* **Verification** compares the replica's digests with the primary's digest map, the
  record of what was captured and acknowledged. Blocks still in the pending log (captured,
  not yet acknowledged) are left out: they differ legitimately. What differs otherwise is
  a replica that does not hold what was acknowledged: reported as byte ranges.
* **Resynchronization** is for when the pending log passed its bound or change tracking
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
  describe what the replica holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import frproto as fp

from .client import RecoveryClient
from .digest_map import DIGEST_SIZE, DigestMap


@dataclass(frozen=True)
class Difference:
    """A byte range of a disk where the replica differs."""

    disk_index: int
    offset: int
    length: int


@dataclass
class VerifyResult:
    """What a verification found."""

    vmid: str
    sequence: int  #: the acknowledged sequence the replica was compared at
    blocks: int = 0  #: blocks compared
    skipped: int = 0  #: blocks left out (still in the pending log)
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0
    #: Disks whose image, recorded size and replica size disagree (one line each).
    size_differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the replica holds what was acknowledged, block for block, at the
        disks' sizes."""
        return not self.differences and not self.size_differences

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "vmid": self.vmid,
            "sequence": self.sequence,
            "ok": self.ok,
            "blocks": self.blocks,
            "skipped_pending": self.skipped,
            "differences": [
                {"disk": d.disk_index, "offset": d.offset, "length": d.length}
                for d in self.differences
            ],
            "size_differences": self.size_differences,
            "seconds": round(self.seconds, 3),
        }


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


async def replica_map(
    client: RecoveryClient, vmid: uuid.UUID, disk_index: int, size: int, block_size: int
) -> DigestMap:
    """The replica's digest map of one disk, asked range by range."""
    dmap = DigestMap(size, block_size)
    for first in range(0, dmap.block_count, fp.MAX_DIGESTS):
        count = min(fp.MAX_DIGESTS, dmap.block_count - first)
        answer = await client.digest_map(vmid, disk_index, block_size, first * block_size, count)
        digests = answer.digests
        if len(digests) != count * DIGEST_SIZE:
            raise fp.BadValue(
                f"disk {disk_index}: {len(digests) // DIGEST_SIZE} digests for {count} blocks"
            )
        start = first * DIGEST_SIZE
        dmap.digests[start : start + len(digests)] = digests
    return dmap


def differing_blocks(ours: DigestMap, theirs: DigestMap) -> Iterator[int]:
    """Blocks whose digests differ (or that either side does not know)."""
    a, b = memoryview(ours.digests), memoryview(theirs.digests)
    if a == b:
        return  # the usual case, compared in C
    for block in range(ours.block_count):
        at = block * DIGEST_SIZE
        if a[at : at + DIGEST_SIZE] != b[at : at + DIGEST_SIZE]:
            yield block


def coalesce(disk_index: int, blocks: list[int], block_size: int, size: int) -> list[Difference]:
    """Adjacent blocks as byte ranges (the last one cut at the disk's end)."""
    out: list[Difference] = []
    for block in blocks:
        offset = block * block_size
        length = min(block_size, size - offset)
        if out and out[-1].offset + out[-1].length == offset:
            last = out[-1]
            out[-1] = Difference(disk_index, last.offset, last.length + length)
        else:
            out.append(Difference(disk_index, offset, length))
    return out


def pending_blocks(
    chunks: Iterator[tuple[int, int, bytes]], block_size: int
) -> dict[int, set[int]]:
    """``{disk: blocks}`` touched by the chunks of pending (unacknowledged) cycles."""
    out: dict[int, set[int]] = {}
    for disk_index, offset, data in chunks:
        first = offset // block_size
        last = (offset + max(len(data), 1) - 1) // block_size
        out.setdefault(disk_index, set()).update(range(first, last + 1))
    return out


#: ``progress(bytes_done, bytes_total)`` while images are read.
Progress = Callable[[int, int], None]


def describe(result: VerifyResult) -> str:
    """One line for a person."""
    if result.ok:
        return (
            f"verified: the replica holds sequence {result.sequence}, block for block "
            f"({result.blocks} blocks, {result.skipped} pending left out, "
            f"{result.seconds:.2f} s)"
        )
    if result.size_differences:
        also = f"; {len(result.differences)} ranges differ too" if result.differences else ""
        return f"DIFFERS: {'; '.join(result.size_differences)}{also}"
    total = sum(d.length for d in result.differences)
    first = result.differences[0]
    return (
        f"DIFFERS: {len(result.differences)} ranges ({total} bytes) do not match sequence "
        f"{result.sequence} (first: disk {first.disk_index} offset {first.offset}); "
        "resynchronize"
    )

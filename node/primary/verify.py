"""Online verification: does the replica hold what this primary acknowledged?

Verification asks the recovery server for the replica's block digests
(``DigestMapRequest``, up to ``frproto.limits.MAX_DIGESTS`` blocks per request); no disk data
crosses for the comparison. It compares them with the primary's digest map, the record of
what was captured and acknowledged. Blocks still in the pending log (captured, not yet
acknowledged) are left out: they differ legitimately. What differs otherwise is a replica
that does not hold what was acknowledged: reported as byte ranges. A planned failover's
last check (:meth:`Verification.compare_disks`) compares with the disks themselves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import trio

import frproto as fp

from .client import RecoveryClient
from .digest_map import DIGEST_SIZE, DigestMap
from .disks import size_differences
from .pending_log import PendingLog
from .record import VMRecord
from .scan import digest_image

#: Opens the relationship where the replica lives (never creating it).
OpenExisting = Callable[[], Awaitable[tuple[RecoveryClient, fp.RelationshipAccepted]]]


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


async def replica_map(
    client: RecoveryClient, vmid: uuid.UUID, disk_index: int, size: int, block_size: int
) -> DigestMap:
    """The replica's digest map of one disk, asked range by range."""
    dmap = DigestMap(size, block_size)
    for first in range(0, dmap.block_count, fp.limits.MAX_DIGESTS):
        count = min(fp.limits.MAX_DIGESTS, dmap.block_count - first)
        answer = await client.digest_map(vmid, disk_index, block_size, first * block_size, count)
        digests = answer.digests
        if len(digests) != count * DIGEST_SIZE:
            raise fp.BadValue(
                f"disk {disk_index}: {len(digests) // DIGEST_SIZE} digests for {count} blocks"
            )
        start = first * DIGEST_SIZE
        dmap.digests[start : start + len(digests)] = digests
    return dmap


async def disks_and_replica(
    client: RecoveryClient,
    vm: VMRecord,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[DigestMap], list[DigestMap]]:
    """``(ours, theirs)``: the digest maps of the VM's disks as they are now, read and
    digested here, and of the replica, fetched from the recovery server, both at once.

    Each side is bound by its own read of the whole image (XXH3-128 runs far faster than
    the read), so the server reads and digests the replica while we read the disks, not
    after. ``progress(done, total)`` reports the bytes of the disks digested.
    """
    block = vm.state.block_size
    disks = vm.disks
    total = sum(d.size for d in disks)
    ours: list[DigestMap] = []
    theirs: list[DigestMap] = []

    async def fetch_theirs() -> None:
        for i, d in enumerate(disks):
            theirs.append(await replica_map(client, vm.vmid, i, d.size, block))

    async def digest_ours() -> None:
        before = 0
        for path, disk in zip(vm.images, disks, strict=True):
            report = None
            if progress is not None:
                report = _reporter(progress, before, total)
            ours.append(await digest_image(path, disk.size, block, progress=report))
            before += disk.size

    failures: list[Exception] = []

    async def first_failure_cancels(work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first_failure_cancels, fetch_theirs)
        nursery.start_soon(first_failure_cancels, digest_ours)
    if failures:
        raise failures[0]  # bare, not in an ExceptionGroup: callers sort errors by kind
    return ours, theirs


def _reporter(
    progress: Callable[[int, int], None], before: int, total: int
) -> Callable[[int], None]:
    return lambda done: progress(before + done, total)


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


@dataclass(frozen=True)
class Verification:
    """Compares one VM's replica with what was acknowledged, or with its disks.

    Attributes:
        vm: the VM (its digest maps are what was captured and acknowledged).
        pending: its pending log (cycles captured, not yet acknowledged).
        open_existing: opens the relationship where the replica lives.
    """

    vm: VMRecord
    pending: PendingLog
    open_existing: OpenExisting

    async def verify(self) -> VerifyResult:
        """Compare the replica with what was acknowledged, by digests only (the disks are
        not read): the differing ranges, if any."""
        started = time.monotonic()
        block = self.vm.state.block_size
        client, accepted = await self.open_existing()
        try:
            result = VerifyResult(self.vm.state.vmid, accepted.applied_sequence)
            # A disk that grew or shrank is not "verified" because its old extent matches.
            result.size_differences = size_differences(
                self.vm.state.disks, [d.size for d in accepted.disks]
            )
            skip: dict[int, set[int]] = {}
            for cycle in self.pending.cycles():
                if cycle.sequence > accepted.applied_sequence:
                    for disk_index, blocks in pending_blocks(
                        self.pending.read_cycle(cycle.sequence), block
                    ).items():
                        skip.setdefault(disk_index, set()).update(blocks)
            for index, disk in enumerate(self.vm.disks):
                theirs = await replica_map(client, self.vm.vmid, index, disk.size, block)
                ours = self.vm.maps[index]
                left_out = skip.get(index, set())
                bad = [b for b in differing_blocks(ours, theirs) if b not in left_out]
                result.blocks += ours.block_count - len(left_out)
                result.skipped += len(left_out)
                result.differences += coalesce(index, bad, block, disk.size)
        finally:
            await client.aclose()
        result.seconds = time.monotonic() - started
        return result

    async def compare_disks(self) -> VerifyResult:
        """Compare the replica with the disks themselves (read and digested), block for
        block: a planned failover's last check."""
        block = self.vm.state.block_size
        client, accepted = await self.open_existing()
        try:
            result = VerifyResult(self.vm.state.vmid, accepted.applied_sequence)
            ours, theirs = await disks_and_replica(client, self.vm)
            for index, disk in enumerate(self.vm.disks):
                blocks = list(differing_blocks(ours[index], theirs[index]))
                result.blocks += theirs[index].block_count
                result.differences += coalesce(index, blocks, block, disk.size)
        finally:
            await client.aclose()
        return result

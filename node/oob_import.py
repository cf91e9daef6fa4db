"""Import an out-of-band IR file into its replica, on the recovery server
(``docs/oob-ir.md``; the format is in :mod:`node.oob_file`).

Import (:func:`import_ir`) needs the relationship to exist on the recovery server (the
primary's first connection creates it) with the same disks; it refuses a replica whose
IR is already complete. Chunks are written straight into the sparse images (zero ranges
are not written on a fresh replica), made durable every :data:`CHECKPOINT_BYTES`, and the
IR is completed (``complete_ir(0)``) only after IREnd and the end of the file checked.
An import never advances the replica's IR cursor: a failed or interrupted one leaves the
replica IN_PROGRESS at (0, 0), claiming nothing, and a new import starts over.
Synchronous: call it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import frproto as fp
from node.oob_file import (
    MAGIC,
    FrameReader,
    OOBFormatError,
    OOBRefused,
    Progress,
    check_magic,
    negotiated_pair,
)
from node.storage import Replica, ReplicaStore
from node.storage.layout import ReplicaLayout

#: An import makes the images durable at least this often.
CHECKPOINT_BYTES: Final = 256 * 1024 * 1024
#: Lock file in the replica's directory, held (``flock``) while an import runs.
IMPORT_LOCK: Final = "oob-import.lock"


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What :func:`import_ir` wrote."""

    path: Path
    storage: Path
    vmid: uuid.UUID
    name: str
    sequence: int
    total_bytes: int
    data_bytes: int
    zero_bytes: int
    chunk_count: int
    aggregate_digest: str  #: hex
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "storage": str(self.storage),
            "vmid": str(self.vmid),
            "name": self.name,
            "sequence": self.sequence,
            "total_bytes": self.total_bytes,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "chunk_count": self.chunk_count,
            "aggregate_digest": self.aggregate_digest,
            "seconds": round(self.seconds, 3),
        }


@contextlib.contextmanager
def _import_lock(store: ReplicaStore, vmid: uuid.UUID) -> Iterator[None]:
    lo = ReplicaLayout(store.root, vmid)
    path = lo.checked(lo.dir / IMPORT_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OOBRefused(f"another import into replica {vmid} is running") from None
            raise
        yield
    finally:
        os.close(fd)


def _open_replica(store: ReplicaStore, create: fp.RelationshipCreate, path: Path) -> Replica:
    try:
        replica = store.open(create.vmid)
    except fp.UnknownVM as exc:
        raise OOBRefused(
            f"{path} is the IR of VM {create.vmid} ({create.vm_name}), which has no "
            f"relationship in {store.root} ({exc}): let the primary connect once so it "
            "creates the relationship, then import"
        ) from None
    if replica.disks != create.disks:
        raise OOBRefused(
            f"{path} does not fit the replica of {create.vmid}: the file's disks are "
            f"{_describe(create.disks)}, the replica's {_describe(replica.disks)}"
        )
    if replica.ir_state is fp.IRState.COMPLETE:
        raise OOBRefused(
            f"the initial replication of replica {create.vmid} is already complete "
            f"(applied sequence {replica.applied_sequence}); nothing imported"
        )
    return replica


def _describe(disks: tuple[fp.DiskInfo, ...]) -> str:
    return "[" + ", ".join(f"{d.disk_id}={d.size}" for d in disks) + "]"


def import_ir(store: ReplicaStore, path: Path, *, progress: Progress | None = None) -> ImportResult:
    """Import the export file at ``path`` into its (existing) replica in ``store``.

    Every frame is checked by a recovery-role :class:`frproto.Connection` before it is
    used: each chunk's digest and bounds, then IREnd's count and aggregate digest; the
    chunks must cover every disk in order and nothing may follow IREnd. Only then is the
    IR completed. Run it while the recovery server is not serving this VM (stopped, or
    before the VM's primary connects): the server keeps its replicas' state in memory.

    Raises:
        OOBRefused: no such relationship, other disks, IR already complete, or another
            import of the same replica running.
        OOBFormatError: not an export file, or frames in the wrong order or not covering
            the disks.
        frproto.DigestMismatch / CountMismatch / TruncatedFrame / ChunkOutOfRange...: the
            file's data does not check; the replica is left IN_PROGRESS at (0, 0).
    """
    started = time.monotonic()
    path = Path(path)
    recovery = negotiated_pair()[1]
    with open(path, "rb", buffering=0) as f:
        check_magic(f.read(len(MAGIC)))
        reader = FrameReader(f, recovery)
        create = reader.next_message()
        if not isinstance(create, fp.RelationshipCreate):
            raise OOBFormatError(f"{path}: the first frame is not a RelationshipCreate")
        replica = _open_replica(store, create, path)
        with _import_lock(store, create.vmid):
            replica = _open_replica(store, create, path)  # again, under the lock
            recovery.send(
                fp.RelationshipAccepted(
                    replica.vmid,
                    replica.disks,
                    generation=replica.generation,
                    ir_state=replica.ir_state,
                    applied_sequence=replica.applied_sequence,
                )
            )
            begin = reader.next_message()
            if not isinstance(begin, fp.IRBegin):
                raise OOBFormatError(f"{path}: the second frame is not an IRBegin")
            if (begin.sequence, begin.start_disk, begin.start_offset) != (0, 0, 0):
                raise OOBFormatError(
                    f"{path}: IRBegin sequence {begin.sequence} at ({begin.start_disk}, "
                    f"{begin.start_offset}); an export is a whole IR at sequence 0"
                )
            replica.begin_ir(begin.sequence)
            try:
                counts = _import_chunks(reader, replica, path, progress)
                replica.complete_ir(begin.sequence)
            except BaseException:
                with contextlib.suppress(Exception):
                    replica.checkpoint_ir(0, 0)  # claim nothing
                raise
    return ImportResult(
        path=path,
        storage=store.root,
        vmid=replica.vmid,
        name=create.vm_name,
        sequence=begin.sequence,
        total_bytes=counts[0] + counts[1],
        data_bytes=counts[0],
        zero_bytes=counts[1],
        chunk_count=counts[2],
        aggregate_digest=counts[3],
        seconds=time.monotonic() - started,
    )


def _import_chunks(
    reader: FrameReader, replica: Replica, path: Path, progress: Progress | None
) -> tuple[int, int, int, str]:
    """Write the chunks up to IREnd; returns (data bytes, zero bytes, chunks, aggregate)."""
    replica.checkpoint_ir(0, 0)  # a resumed IR's cursor is not ours to keep
    sizes = [d.size for d in replica.disks]
    total = sum(sizes)
    disk, offset = 0, 0

    def skip_full() -> None:
        nonlocal disk, offset
        while disk < len(sizes) and offset >= sizes[disk]:
            disk, offset = disk + 1, 0

    skip_full()
    data_bytes = zero_bytes = unsynced = 0
    while True:
        event = reader.next_message()
        if isinstance(event, fp.IREnd):
            break
        if not isinstance(event, fp.Chunk):
            raise OOBFormatError(f"{path}: {type(event).__name__} inside the IR")
        if (event.disk_index, event.offset) != (disk, offset):
            raise OOBFormatError(
                f"{path}: chunk at disk {event.disk_index} offset {event.offset}, expected "
                f"disk {disk} offset {offset} (an export covers every disk in order)"
            )
        if event.is_zero:
            replica.write_ir_chunk(disk, offset, None, length=event.length)
            zero_bytes += event.length
        else:
            replica.write_ir_chunk(disk, offset, event.data)
            data_bytes += event.length
        offset += event.length
        skip_full()
        unsynced += event.length
        if unsynced >= CHECKPOINT_BYTES:
            replica.checkpoint_ir(0, 0)  # durable, yet nothing claimed before IREnd
            unsynced = 0
        if progress is not None:
            progress(data_bytes + zero_bytes, total)
    if disk < len(sizes):
        raise OOBFormatError(
            f"{path}: IREnd at disk {disk} offset {offset}; the disks are not covered"
        )
    reader.expect_end()
    return data_bytes, zero_bytes, event.chunk_count, event.aggregate_digest.hex()

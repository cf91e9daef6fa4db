"""Out-of-band initial replication: export a VM's disks to a file, import it at the
recovery site (``docs/oob-ir.md``).

A VM whose disks are too large for the link is exported on the primary, the file is
carried (disk, courier, another network) and imported into the relationship on the
recovery server; replication then goes on with delta batches only, no IR data on the
wire.

File format (version 1)::

    magic      8 bytes   b"FRREPIR1" ("FRREPIR" + the format version as an ASCII digit)
    frames     frproto frames, byte for byte as on the wire (docs/protocol.md):
               RelationshipCreate   vmid, VM name, disks, config blob
               IRBegin              sequence 0, start (0, 0), total_bytes = sum of sizes
               Chunk * N            every disk in order, in 1 MiB chunks from offset 0
                                    to the disk's end (the last one shorter); an all-zero
                                    chunk is a ZERO chunk (no payload); each chunk carries
                                    the XXH3-128 digest of its data
               IREnd                sequence 0, chunk count N, aggregate digest
    (end of file right after IREnd)

The frames are made with :func:`frproto.encode_frame` (the IREnd's aggregate with
:class:`frproto.AggregateDigest`; a ZERO chunk is framed without the whole-chunk
comparison a Connection's ``send_chunk`` makes) and read back by a recovery-role
:class:`frproto.Connection`, driven through negotiation and the relationship locally (it
answers the file's RelationshipCreate with the replica's own disks), so frproto itself
checks every chunk's digest (and ZERO flag), its bounds against the
replica's disks, the count and the aggregate digest at IREnd; a file that ends inside a
frame raises :class:`frproto.TruncatedFrame`. On top of that the importer requires the
chunks to cover every disk exactly once, in order (frproto leaves coverage to the
application) and nothing after IREnd.

Export (:func:`export_ir`) also records, exactly as the online IR does, the primary's
digest maps of what it exported (``<state_dir>/<vmid>/digests-<i>.map``), so the first
cycle after the import sends only the blocks that changed since the export. It then
leaves the marker :data:`EXPORTED_MARKER` in the VM's directory: the replicator creates
the relationship but sends no IR data, and waits until the recovery server reports the
IR complete (:func:`is_exported`).

Import (:func:`import_ir`) needs the relationship to exist on the recovery server (the
primary's first connection creates it) with the same disks; it refuses a replica whose
IR is already complete. Chunks are written straight into the sparse images (zero ranges
are not written on a fresh replica), made durable every :data:`CHECKPOINT_BYTES`, and the
IR is completed (``complete_ir(0)``) only after IREnd and the end of the file checked.
An import never advances the replica's IR cursor: a failed or interrupted one leaves the
replica IN_PROGRESS at (0, 0), claiming nothing, and a new import starts over.

Both functions are synchronous (call them through ``trio.to_thread`` from Trio code).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import xxhash

import frproto as fp
from node.primary.digest_map import DigestMap
from node.primary.state import PrimaryStateStore, VMReplicationState, fsync_dir, write_file_atomic
from node.storage import Replica, ReplicaStore
from node.storage.layout import ReplicaLayout

#: First bytes of an export file; the last byte is the format version.
MAGIC: Final = b"FRREPIR1"
_MAGIC_STEM: Final = MAGIC[:-1]
#: Bytes per chunk of an export (as the online IR's chunks).
CHUNK: Final = 1024 * 1024
#: An import makes the images durable at least this often.
CHECKPOINT_BYTES: Final = 256 * 1024 * 1024
#: File in the primary's VM directory saying the IR travels out of band.
EXPORTED_MARKER: Final = "ir-exported.json"
#: Lock file in the replica's directory, held (``flock``) while an import runs.
IMPORT_LOCK: Final = "oob-import.lock"
#: Write buffer of the export file.
_WRITE_BUFFER: Final = 8 * 1024 * 1024
_NEGOTIATION = fp.NegotiateRequest(compression=fp.CompressionSet(0))
_POLICY = fp.ServerPolicy(fp.RecoveryType.STANDALONE, "oob.invalid", compression=())

#: ``progress(bytes_done, bytes_total)``, called after every chunk.
Progress = Callable[[int, int], None]


class OOBError(Exception):
    """An out-of-band IR cannot be exported or imported (the message says why)."""


class OOBFormatError(OOBError):
    """The file is not a well-formed export (magic, version, frame order, coverage)."""


class OOBRefused(OOBError):
    """The VM or the replica is not in a state to take this export or import."""


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """What an export file is for: its RelationshipCreate."""

    vmid: uuid.UUID
    name: str
    disks: tuple[fp.DiskInfo, ...]
    config: bytes


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What :func:`export_ir` wrote."""

    path: Path
    vmid: uuid.UUID
    name: str
    disks: int
    total_bytes: int  #: bytes of disk covered (sum of the disk sizes)
    data_bytes: int  #: bytes carried as data
    zero_bytes: int  #: bytes carried as ZERO chunks
    chunk_count: int
    file_bytes: int
    aggregate_digest: str  #: hex
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "vmid": str(self.vmid),
            "name": self.name,
            "disks": self.disks,
            "total_bytes": self.total_bytes,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "chunk_count": self.chunk_count,
            "file_bytes": self.file_bytes,
            "aggregate_digest": self.aggregate_digest,
            "seconds": round(self.seconds, 3),
        }


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


# --------------------------------------------------------------------------------------
# the primary's side


def map_path(vm_dir: Path, disk_index: int) -> Path:
    """A disk's digest map in the VM's directory (the name ``VMReplicator`` uses)."""
    return vm_dir / f"digests-{disk_index}.map"


def is_exported(vm_dir: Path) -> bool:
    """Whether the VM's IR was exported (the replicator then sends no IR data)."""
    return (vm_dir / EXPORTED_MARKER).is_file()


def _negotiated_pair() -> tuple[fp.Connection, fp.Connection]:
    """A primary and a recovery Connection, negotiated with each other in memory."""
    primary = fp.Connection(fp.Role.PRIMARY)
    recovery = fp.Connection(fp.Role.RECOVERY)
    recovery.receive_data(primary.send(_NEGOTIATION))
    request = recovery.next_event()
    assert isinstance(request, fp.NegotiateRequest)
    primary.receive_data(recovery.send(fp.answer_negotiation(request, _POLICY)))
    answer = primary.next_event()
    assert isinstance(answer, fp.NegotiateResponse)
    assert answer.ok
    return primary, recovery


def _read_full(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def export_ir(
    state: VMReplicationState,
    store_root: Path,
    out: Path,
    *,
    config: bytes = b"",
    progress: Progress | None = None,
) -> ExportResult:
    """Export the VM's disks to ``out`` for an out-of-band IR.

    Reads every image once: writes the file (atomically: a temporary file beside ``out``,
    fsync, rename, directory fsync), builds the digest map of each disk from the same
    data and saves it where the replicator keeps it, leaves :data:`EXPORTED_MARKER`, and
    saves ``state`` (``ir_state`` NOT_STARTED, cursor (0, 0)) in the
    :class:`PrimaryStateStore` at ``store_root``.

    The images must not change while this runs (a paused VM or a snapshot), and the VM's
    replication should be paused so that no online IR starts meanwhile.

    Raises:
        OOBRefused: the VM's IR is already complete.
        OSError: an image or the output could not be read or written (``out`` untouched).
    """
    if state.ir_state == "COMPLETE":
        raise OOBRefused(
            f"the initial replication of {state.name} ({state.vmid}) is already complete"
        )
    started = time.monotonic()
    vmid = uuid.UUID(state.vmid)
    disks = tuple(fp.DiskInfo(d["disk_id"], int(d["size"])) for d in state.disks)
    images = [Path(d["path"]) for d in state.disks]
    block = state.block_size
    maps = [DigestMap(d.size, block) for d in disks]
    total = sum(d.size for d in disks)

    create = fp.RelationshipCreate(vmid, state.name, disks, config)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    counts = {"data": 0, "zero": 0}
    aggregate = fp.AggregateDigest()
    try:
        with open(tmp, "xb", buffering=_WRITE_BUFFER) as f:
            f.write(MAGIC)
            f.write(fp.encode_frame(create))
            f.write(fp.encode_frame(fp.IRBegin(vmid, 0, 0, 0, total_bytes=total)))
            _export_chunks(f, aggregate, images, disks, maps, counts, progress)
            f.write(fp.encode_frame(fp.IREnd(vmid, 0, aggregate.count, aggregate.digest())))
            f.flush()
            os.fsync(f.fileno())
            file_bytes = f.tell()
        os.rename(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)

    store = PrimaryStateStore(store_root)
    vm_dir = store.vm_dir(state.vmid)
    vm_dir.mkdir(parents=True, exist_ok=True)
    for index, dmap in enumerate(maps):
        dmap.save(map_path(vm_dir, index))
    marker = {
        "format": 1,
        "file": str(out.resolve()),
        "exported_at": time.time(),
        "chunk_count": aggregate.count,
        "aggregate_digest": aggregate.digest().hex(),
        "total_bytes": total,
        "block_size": block,
    }
    write_file_atomic(vm_dir / EXPORTED_MARKER, json.dumps(marker, indent=1).encode() + b"\n")
    state.ir_state = "NOT_STARTED"
    state.ir_cursor = [0, 0]
    state.sequence = 0
    # A running service's replicator of this VM must start over from this state (and
    # see the export), not carry on with what it held: another writer's token says so.
    state.written_by = uuid.uuid4().hex
    store.save(state)
    return ExportResult(
        path=out,
        vmid=vmid,
        name=state.name,
        disks=len(disks),
        total_bytes=total,
        data_bytes=counts["data"],
        zero_bytes=counts["zero"],
        chunk_count=aggregate.count,
        file_bytes=file_bytes,
        aggregate_digest=aggregate.digest().hex(),
        seconds=time.monotonic() - started,
    )


def _export_chunks(
    f: IO[bytes],
    aggregate: fp.AggregateDigest,
    images: list[Path],
    disks: tuple[fp.DiskInfo, ...],
    maps: list[DigestMap],
    counts: dict[str, int],
    progress: Progress | None,
) -> None:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    zeros = memoryview(bytes(CHUNK))
    digest = xxhash.xxh3_128_digest
    total = sum(d.size for d in disks)
    done = 0
    for disk_index, (path, disk) in enumerate(zip(images, disks, strict=True)):
        dmap = maps[disk_index]
        block = dmap.block_size
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, disk.size, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            while offset < disk.size:
                n = min(CHUNK, disk.size - offset)
                data = view[:n]
                got = _read_full(fd, data, offset)
                if got < n:  # an image shorter than its disk reads as zeros (as a scan does)
                    data[got:] = zeros[: n - got]
                if buffer.startswith(zeros[:n]):
                    chunk_digest = fp.zero_digest(n)
                    frame = fp.encode_frame(
                        fp.Chunk(disk_index, offset, n, chunk_digest, b"", fp.ChunkFlags.ZERO)
                    )
                    for start in range(0, n, block):
                        length = min(block, n - start)
                        dmap.set((offset + start) // block, fp.zero_digest(length))
                    counts["zero"] += n
                else:
                    chunk_digest = digest(data)
                    frame = fp.encode_frame(fp.Chunk(disk_index, offset, n, chunk_digest, data))
                    for start in range(0, n, block):
                        dmap.set((offset + start) // block, digest(data[start : start + block]))
                    counts["data"] += n
                f.write(frame)
                aggregate.add(chunk_digest)
                offset += n
                done += n
                if progress is not None:
                    progress(done, total)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------
# the recovery server's side


def read_header(path: Path) -> ExportHeader:
    """The RelationshipCreate at the start of an export file (nothing else is checked).

    Raises:
        OOBFormatError: not an export file of a known version.
        frproto.FrprotoError: the first frame is malformed or truncated.
    """
    with open(path, "rb") as f:
        _check_magic(f.read(len(MAGIC)))
        envelope = f.read(fp.ENVELOPE_SIZE)
        recovery = _negotiated_pair()[1]
        if len(envelope) < fp.ENVELOPE_SIZE:
            raise fp.TruncatedFrame(f"{path}: the file ends before its first frame")
        size = recovery.frame_size(envelope)
        frame = envelope + f.read(size - fp.ENVELOPE_SIZE)
    if len(frame) < size:
        raise fp.TruncatedFrame(f"{path}: the file ends inside its first frame")
    message = fp.decode_frame(frame)
    if not isinstance(message, fp.RelationshipCreate):
        raise OOBFormatError(f"{path}: the first frame is not a RelationshipCreate")
    return ExportHeader(message.vmid, message.vm_name, message.disks, message.config)


def _check_magic(head: bytes) -> None:
    if head == MAGIC:
        return
    if len(head) < len(MAGIC) and MAGIC.startswith(head):
        raise fp.TruncatedFrame("the file ends inside its magic")
    if head.startswith(_MAGIC_STEM):
        raise OOBFormatError(
            f"out-of-band IR file format {head[len(_MAGIC_STEM) :]!r} is not supported "
            f"(this version reads {MAGIC!r})"
        )
    raise OOBFormatError(f"not an out-of-band IR file (starts with {head!r}, not {MAGIC!r})")


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
    recovery = _negotiated_pair()[1]
    with open(path, "rb", buffering=0) as f:
        _check_magic(f.read(len(MAGIC)))
        reader = _FrameReader(f, recovery)
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
    reader: _FrameReader, replica: Replica, path: Path, progress: Progress | None
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


class _FrameReader:
    """Feeds an export file to a recovery-role Connection one whole frame at a time
    (so payloads are not copied), the envelope checked before the body is read."""

    def __init__(self, f: io.FileIO, conn: fp.Connection) -> None:
        self._f = f
        self._conn = conn
        self._buffer = bytearray(fp.ENVELOPE_SIZE + fp.CHUNK_HEADER_SIZE + fp.MAX_CHUNK_DATA)
        self._view = memoryview(self._buffer)
        self._eof = False

    def _read_into(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            n = self._f.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def _feed_frame(self) -> None:
        """Feed one frame (or, at the end of the file, what is left and the end)."""
        if self._eof:
            return
        view = self._view
        got = self._read_into(view[: fp.ENVELOPE_SIZE])
        if got < fp.ENVELOPE_SIZE:
            if got:
                self._conn.receive_data(bytes(view[:got]))
            self._conn.receive_data(b"")
            self._eof = True
            return
        size = self._conn.frame_size(view[: fp.ENVELOPE_SIZE])
        got = self._read_into(view[fp.ENVELOPE_SIZE : size]) + fp.ENVELOPE_SIZE
        self._conn.receive_data(view[:got])
        if got < size:
            self._conn.receive_data(b"")
            self._eof = True

    def next_message(self) -> fp.Message:
        """The next message; TruncatedFrame if the file ends before one."""
        while True:
            event = self._conn.next_event()
            if isinstance(event, fp.NeedData):
                self._feed_frame()
                continue
            if isinstance(event, fp.UnknownMessage):
                continue  # an ignorable tag, as on the wire
            if isinstance(event, fp.ConnectionClosed):
                raise fp.TruncatedFrame("the file ends before IREnd")
            return event

    def expect_end(self) -> None:
        """Nothing may follow IREnd."""
        self._feed_frame()
        if not self._eof:
            raise OOBFormatError("data follows IREnd")
        event = self._conn.next_event()
        if not isinstance(event, fp.ConnectionClosed):
            raise OOBFormatError("data follows IREnd")

"""Export a VM's disks to an out-of-band IR file, on the primary (``docs/oob-ir.md``;
the format is in :mod:`node.oob_file`).

Export (:func:`export_ir`) also records, exactly as the online IR does, the primary's
digest maps of what it exported (``<state_dir>/<vmid>/digests-<i>.map``), so the first
cycle after the import sends only the blocks that changed since the export. It then
leaves the marker :data:`EXPORTED_MARKER` in the VM's directory: the replicator creates
the relationship but sends no IR data, and waits until the recovery server reports the
IR complete (:func:`is_exported`). Synchronous: call it through ``trio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import xxhash

import frproto as fp
from node.oob_file import CHUNK, MAGIC, OOBRefused, Progress

from .digest_map import DigestMap
from .image_view import view_of
from .scan import read_full
from .state import (
    IRStage,
    PrimaryStateStore,
    VMReplicationState,
    fsync_dir,
    write_file_atomic,
)

#: File in the primary's VM directory saying the IR travels out of band.
EXPORTED_MARKER: Final = "ir-exported.json"
#: Write buffer of the export file.
_WRITE_BUFFER: Final = 8 * 1024 * 1024


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


def map_path(vm_dir: Path, disk_index: int) -> Path:
    """A disk's digest map in the VM's directory (the name ``VMReplicator`` uses)."""
    return vm_dir / f"digests-{disk_index}.map"


def is_exported(vm_dir: Path) -> bool:
    """Whether the VM's IR was exported (the replicator then sends no IR data)."""
    return (vm_dir / EXPORTED_MARKER).is_file()


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
    if state.ir_state == IRStage.COMPLETE:
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
    counts = {"data": 0, "zero": 0}
    aggregate = fp.codec.AggregateDigest()
    out = Path(out)
    file_bytes = _write_file(out, create, total, images, maps, aggregate, counts, progress)
    _record_export(state, store_root, out, maps, aggregate, total)
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


def _write_file(
    out: Path,
    create: fp.RelationshipCreate,
    total: int,
    images: list[Path],
    maps: list[DigestMap],
    aggregate: fp.codec.AggregateDigest,
    counts: dict[str, int],
    progress: Progress | None,
) -> int:
    """Write the export file atomically (a temporary file beside ``out``, fsync, rename,
    directory fsync); the file's size."""
    vmid = create.vmid
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb", buffering=_WRITE_BUFFER) as f:
            f.write(MAGIC)
            f.write(fp.codec.encode_frame(create))
            f.write(fp.codec.encode_frame(fp.IRBegin(vmid, 0, 0, 0, total_bytes=total)))
            _export_chunks(f, aggregate, images, create.disks, maps, counts, progress)
            f.write(fp.codec.encode_frame(fp.IREnd(vmid, 0, aggregate.count, aggregate.digest())))
            f.flush()
            os.fsync(f.fileno())
            file_bytes = f.tell()
        os.rename(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)
    return file_bytes


def _record_export(
    state: VMReplicationState,
    store_root: Path,
    out: Path,
    maps: list[DigestMap],
    aggregate: fp.codec.AggregateDigest,
    total: int,
) -> None:
    """Save the digest maps, the exported marker and the VM's state (IR from the start)."""
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
        "block_size": state.block_size,
    }
    write_file_atomic(vm_dir / EXPORTED_MARKER, json.dumps(marker, indent=1).encode() + b"\n")
    state.ir_state = IRStage.NOT_STARTED
    state.ir_cursor = [0, 0]
    state.sequence = 0
    # A running service's replicator of this VM must start over from this state (and
    # see the export), not carry on with what it held: another writer's token says so.
    state.written_by = uuid.uuid4().hex
    store.save(state)


def _export_chunks(
    f: IO[bytes],
    aggregate: fp.codec.AggregateDigest,
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
        source = view_of(path)  # a QEMU VM's point in time (node/primary/qemu/oob.py)
        fd = os.open(os.devnull if source else path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, disk.size, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            while offset < disk.size:
                n = min(CHUNK, disk.size - offset)
                data = view[:n]
                if source is not None:
                    got = len(piece := source.pread(n, offset))
                    data[:got] = piece
                else:
                    got = read_full(fd, data, offset)
                if got < n:  # an image shorter than its disk reads as zeros (as a scan does)
                    data[got:] = zeros[: n - got]
                if buffer.startswith(zeros[:n]):
                    chunk_digest = fp.codec.zero_digest(n)
                    frame = fp.codec.encode_frame(
                        fp.Chunk(disk_index, offset, n, chunk_digest, b"", fp.ChunkFlags.ZERO)
                    )
                    for start in range(0, n, block):
                        length = min(block, n - start)
                        dmap.set((offset + start) // block, fp.codec.zero_digest(length))
                    counts["zero"] += n
                else:
                    chunk_digest = digest(data)
                    frame = fp.codec.encode_frame(
                        fp.Chunk(disk_index, offset, n, chunk_digest, data)
                    )
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

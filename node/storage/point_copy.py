"""Where a replica is copied out as of a kept recovery point, while it goes on replicating
(test failover builds its VM with it).

The copy runs in any process (``frctl failover test``), beside a recovery server that
goes on applying batches to the same replica. It takes no lock the server knows of;
instead each piece is read optimistically: the replica's state file and its journal
directory are read before and after the piece, and the piece is read again if a batch was
being applied meanwhile (a journal present, or a new state). The piece itself is the
image's bytes with the undo data of every point newer than the wanted one laid over them,
as ``Replica.read`` does; the point must stay kept until the copy ends (a copy that
outlives it fails with OUT_OF_SEQUENCE).

All-zero pieces are not written: the copy is as sparse as the replica.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import frproto

from . import layout as lay
from .fileio import FileIO
from .journal import Record, read_undo
from .points import RecoveryPoint, overlay
from .state import state_document

#: Bytes read per piece.
PIECE = 4 * 1024 * 1024
#: How long one piece waits for a batch being applied to end.
BUSY_TIMEOUT = 60.0


@dataclass(frozen=True)
class PointCopy:
    """A replica copied out at one point."""

    vmid: uuid.UUID
    sequence: int
    directory: Path
    config: Path
    disks: tuple[Path, ...]
    bytes_written: int
    seconds: float


def _snapshot(lo: lay.ReplicaLayout) -> tuple[bytes, bool]:
    """The state file's bytes, and whether a batch may be in progress: a journal newer
    than the applied sequence. A journal of an applied batch is one whose removal failed
    (the images hold it already; recovery removes it): waiting for it would make a test
    failover fail BUSY until the next batch came."""
    raw = lo.state.read_bytes()
    applied = int(json.loads(raw).get("applied_sequence", 0))
    busy = False
    for name in os.listdir(lo.journal_dir):
        if name.endswith(lay.JOURNAL_SUFFIX):
            seq = lay.parse_seq_name(name, lay.JOURNAL_SUFFIX)
            busy = busy or seq is None or seq > applied
    return raw, busy


def _points(raw: bytes) -> tuple[dict[str, object], list[RecoveryPoint]]:
    try:
        doc = state_document(raw)
    except ValueError as exc:
        raise frproto.InternalError(f"the replica's state file is damaged: {exc}") from exc
    return doc, [RecoveryPoint.from_json(p) for p in doc.get("points", [])]


def copy_point(
    storage: Path,
    vmid: uuid.UUID,
    out: Path,
    sequence: int | None = None,
    *,
    io: FileIO | None = None,
) -> PointCopy:
    """Copy the replica of ``vmid`` (under ``storage``) as of recovery point ``sequence``
    (default: the latest) into the new directory ``out``: ``config.bin`` and one sparse
    image per disk under ``disks/``. Durable on return: every file and directory of the
    copy is synced, and ``out``'s entry in its parent. ``io`` replaces the system calls
    that write the copy (the power-loss and I/O-error tests).

    Raises:
        frproto.UnknownVM: no such replica; frproto.OutOfSequence: the point is not kept
            (or stopped being kept during the copy); FileExistsError: ``out`` exists.
    """
    started = time.monotonic()
    lo = lay.ReplicaLayout(storage, vmid)
    if not lo.state.exists():
        raise frproto.UnknownVM(f"no replica of {vmid} under {storage}")
    raw, _ = _snapshot(lo)
    doc, points = _points(raw)
    if int(doc.get("reverting_to", -1)) >= 0:  # type: ignore[call-overload]
        # the images are part way between two points until the failover's revert ends
        raise frproto.Busy(f"replica {vmid}: a failover is being finished; try again")
    if sequence is None:
        sequence = int(doc["applied_sequence"])  # type: ignore[call-overload]
    if all(p.sequence != sequence for p in points):
        raise frproto.OutOfSequence(f"replica {vmid}: no recovery point {sequence} is kept")
    disks = [(str(d["disk_id"]), int(d["size"])) for d in doc["disks"]]  # type: ignore[attr-defined]
    undo_cache: dict[int, list[Record]] = {}
    io = io if io is not None else FileIO(None)
    missing = [d for d in out.parents if not d.exists()]
    for d in reversed(missing):
        io.mkdir(d, exist_ok=True)
    io.mkdir(out)
    io.mkdir(out / "disks")
    config = out / "config.bin"
    _write_new(io, config, lo.config.read_bytes())
    written = 0
    images = []
    for index, (disk_id, size) in enumerate(disks):
        lay.check_disk_id(disk_id)
        target = out / "disks" / f"{disk_id}.img"
        images.append(target)
        src = os.open(lo.image(disk_id), os.O_RDONLY)
        try:
            dst = io.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(src)
            raise
        try:
            io.truncate(dst, size, target)
            for offset in range(0, size, PIECE):
                n = min(PIECE, size - offset)
                piece = _read_piece(lo, src, index, offset, n, sequence, undo_cache)
                if any(piece):  # zeros stay a hole
                    io.pwrite(dst, piece, offset, target)
                    written += len(piece)
            io.fsync(dst, target)
        finally:
            os.close(src)
            os.close(dst)
    # A power cut must not leave a copy whose names are missing (POSIX makes a new name
    # durable only with a sync of its directory).
    io.fsync_dir(out / "disks")
    for d in (out, *missing):
        io.fsync_dir(d.parent)
    io.fsync_dir(out)
    return PointCopy(
        vmid, sequence, out, config, tuple(images), written, time.monotonic() - started
    )


def _write_new(io: FileIO, path: Path, data: bytes) -> None:
    fd = io.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        io.pwrite(fd, data, 0, path)
        io.fsync(fd, path)
    finally:
        os.close(fd)


def _read_piece(
    lo: lay.ReplicaLayout,
    fd: int,
    disk_index: int,
    offset: int,
    length: int,
    sequence: int,
    undo_cache: dict[int, list[Record]],
) -> bytearray:
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        before, busy_before = _snapshot(lo)
        if not busy_before:
            _, points = _points(before)
            if all(p.sequence != sequence for p in points):
                raise frproto.OutOfSequence(
                    f"recovery point {sequence} stopped being kept during the copy"
                )
            buf = bytearray(length)
            got = os.preadv(fd, [buf], offset)
            if got != length:
                raise frproto.InternalError(f"short read of disk {disk_index} at {offset}")
            try:
                for point in reversed(points):
                    if point.sequence <= sequence:
                        break
                    _overlay(lo, point.sequence, buf, disk_index, offset, undo_cache)
            except FileNotFoundError:
                pass  # pruned meanwhile: the state has changed, read the piece again
            else:
                after, busy_after = _snapshot(lo)
                if after == before and not busy_after:
                    return buf
        if time.monotonic() > deadline:
            raise frproto.Busy("the replica kept applying batches; try again")
        time.sleep(0.02)


def _overlay(
    lo: lay.ReplicaLayout,
    seq: int,
    buf: bytearray,
    disk_index: int,
    offset: int,
    cache: dict[int, list[Record]],
) -> None:
    path = lo.checked(lo.undo(seq))
    records = cache.get(seq)
    if records is None:  # an undo file never changes while its point is kept
        records = cache[seq] = read_undo(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        overlay(buf, disk_index, offset, records, fd)
    finally:
        os.close(fd)

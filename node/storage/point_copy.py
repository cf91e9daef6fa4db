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
from .journal import Record, read_undo
from .points import RecoveryPoint, overlay

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
    """The state file's bytes, and whether a batch may be in progress."""
    raw = lo.state.read_bytes()
    busy = any(n.endswith(lay.JOURNAL_SUFFIX) for n in os.listdir(lo.journal_dir))
    return raw, busy


def _points(raw: bytes) -> tuple[dict[str, object], list[RecoveryPoint]]:
    doc = json.loads(raw)
    return doc, [RecoveryPoint.from_json(p) for p in doc.get("points", [])]


def copy_point(storage: Path, vmid: uuid.UUID, out: Path, sequence: int | None = None) -> PointCopy:
    """Copy the replica of ``vmid`` (under ``storage``) as of recovery point ``sequence``
    (default: the latest) into the new directory ``out``: ``config.bin`` and one sparse
    image per disk under ``disks/``.

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
    if sequence is None:
        sequence = int(doc["applied_sequence"])  # type: ignore[call-overload]
    if all(p.sequence != sequence for p in points):
        raise frproto.OutOfSequence(f"replica {vmid}: no recovery point {sequence} is kept")
    disks = [(str(d["disk_id"]), int(d["size"])) for d in doc["disks"]]  # type: ignore[attr-defined]
    undo_cache: dict[int, list[Record]] = {}
    out.mkdir(parents=True)
    (out / "disks").mkdir()
    config = out / "config.bin"
    config.write_bytes(lo.config.read_bytes())
    written = 0
    images = []
    for index, (disk_id, size) in enumerate(disks):
        lay.check_disk_id(disk_id)
        target = out / "disks" / f"{disk_id}.img"
        images.append(target)
        src = os.open(lo.image(disk_id), os.O_RDONLY)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(dst, size)
            for offset in range(0, size, PIECE):
                n = min(PIECE, size - offset)
                piece = _read_piece(lo, src, index, offset, n, sequence, undo_cache)
                if any(piece):  # zeros stay a hole
                    os.pwrite(dst, piece, offset)
                    written += len(piece)
            os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
    return PointCopy(
        vmid, sequence, out, config, tuple(images), written, time.monotonic() - started
    )


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

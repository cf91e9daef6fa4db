"""The replica storage engine: replicas, initial replication, journaled delta batches.

Synchronous and thread-safe per replica (one lock each); the recovery server calls the
long operations through ``trio.to_thread``. The on-disk layout is in
:mod:`node.storage.layout`, the file formats in :mod:`node.storage.journal`, and
``docs/storage.md`` argues why a crash at any instant leaves each replica at one recovery
point.

A delta batch commits in this order (each step durable before the next starts):

1. ``add`` appends DATA/ZERO records to ``journal/<seq>.jrnl`` (no fsync yet);
2. ``commit`` appends the END (commit) record, fsyncs the journal and its directory;
   from here on the batch *will* be applied, now or by ``recover``;
3. the ranges the batch covers are read from the images into ``undo/<seq>.undo``, which
   gets its own END record and is fsynced (the images are still untouched);
4. the ranges are reserved (``posix_fallocate``), written (``copy_file_range`` from the
   journal; zero ranges punched), and every touched image is fsynced once;
5. ``state.json`` is replaced atomically with the new ``applied_sequence`` and point list;
6. the journal is unlinked, and undo files of pruned points are removed.

A failure before step 2 completes discards the batch; a failure in steps 3-5 rolls the
images back from the undo file (or leaves the committed journal for ``recover``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import frproto
from frproto import DiskInfo, IRState

from . import layout as lay
from .fileio import Buffer, FileIO, StorageFaults, mapped, open_flags, os_error
from .journal import (
    FILE_HEADER,
    JOURNAL_MAGIC,
    KIND_DATA,
    RECORD,
    UNDO_MAGIC,
    FileWriter,
    Record,
    read_file,
    read_undo,
)
from .points import RecoveryPoint, needed_undo, overlay, prune

STATE_FORMAT: Final = 1
#: Spare journal/undo files kept for reuse per replica: a commit frees one journal and,
#: once the point list is full, one undo file, and the next batch takes one of each.
_MAX_SPARES: Final = 2
#: Read/write window of the undo capture and of applying a journal.
_WINDOW: Final = 8 << 20
_SEEK_DATA: Final = getattr(os, "SEEK_DATA", 3)


#: Offset and length multiple for an O_DIRECT IR write (the page size covers every
#: logical block size in use); other chunks go through the page cache.
DIRECT_ALIGN: Final = 4096
_O_DIRECT: Final = getattr(os, "O_DIRECT", 0)


class AlreadyApplied(Exception):
    """The batch's sequence is not newer than ``applied_sequence``: it was applied
    before (a resend after a lost acknowledgement). The server re-acknowledges it."""

    def __init__(self, sequence: int, applied_sequence: int) -> None:
        super().__init__(f"batch {sequence} already applied (applied_sequence={applied_sequence})")
        self.sequence = sequence
        self.applied_sequence = applied_sequence


# --------------------------------------------------------------------------------------
# durable state


@dataclass(frozen=True, slots=True)
class _State:
    vmid: UUID
    name: str
    disks: tuple[DiskInfo, ...]
    primary: str
    trust_group: str
    generation: int = 1
    ir_state: IRState = IRState.NOT_STARTED
    ir_sequence: int = 0
    ir_cursor: tuple[int, int] = (0, 0)
    ir_resumed: bool = False
    applied_sequence: int = 0
    points: tuple[RecoveryPoint, ...] = field(default_factory=tuple)
    #: The VM was failed over to this site: no primary may replicate to it any more.
    failed_over: bool = False
    #: A failover in progress reverts the images to this point (-1: none).
    reverting_to: int = -1

    def to_bytes(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "vmid": str(self.vmid),
            "name": self.name,
            "disks": [{"disk_id": d.disk_id, "size": d.size} for d in self.disks],
            "primary": self.primary,
            "trust_group": self.trust_group,
            "generation": self.generation,
            "ir_state": int(self.ir_state),
            "ir_sequence": self.ir_sequence,
            "ir_cursor": list(self.ir_cursor),
            "ir_resumed": self.ir_resumed,
            "applied_sequence": self.applied_sequence,
            "points": [p.to_json() for p in self.points],
        }
        if self.failed_over:
            doc["failed_over"] = True
        if self.reverting_to >= 0:
            doc["reverting_to"] = self.reverting_to
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> _State:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError("unknown state format")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = doc.get(key)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise ValueError(f"state field {key!r} is missing or has the wrong type")
            return value

        disks = []
        for d in get("disks", list):
            if not isinstance(d, dict):
                raise ValueError("disk entry is not an object")
            disk_id, size = d.get("disk_id"), d.get("size")
            if not isinstance(disk_id, str) or not isinstance(size, int) or size < 0:
                raise ValueError("disk entry has the wrong types")
            lay.check_disk_id(disk_id)
            disks.append(DiskInfo(disk_id=disk_id, size=size))
        cursor = get("ir_cursor", list)
        if len(cursor) != 2 or not all(isinstance(c, int) for c in cursor):
            raise ValueError("ir_cursor is not two integers")
        return cls(
            vmid=UUID(get("vmid", str)),
            name=get("name", str),
            disks=tuple(disks),
            primary=get("primary", str),
            trust_group=get("trust_group", str),
            generation=get("generation", int),
            ir_state=IRState(get("ir_state", int)),
            ir_sequence=get("ir_sequence", int),
            ir_cursor=(cursor[0], cursor[1]),
            ir_resumed=get("ir_resumed", bool),
            applied_sequence=get("applied_sequence", int),
            points=tuple(RecoveryPoint.from_json(p) for p in get("points", list)),
            failed_over=bool(doc.get("failed_over", False)),
            reverting_to=int(doc.get("reverting_to", -1)),
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------------------
# replica


class Replica:
    """One replica VM's storage. Obtain it from :class:`ReplicaStore`; one instance per
    VMID per store, shared by every caller."""

    def __init__(self, io: FileIO, lo: lay.ReplicaLayout, state: _State, keep_points: int) -> None:
        self._io = io
        self._lay = lo
        self._st = state
        self._keep = keep_points
        self._lock = threading.RLock()
        self._paths = tuple(lo.checked(lo.image(d.disk_id)) for d in state.disks)
        self._fds: list[int] = []
        self._direct_fds: dict[int, int] = {}
        self._direct_ok = True
        self._undo_index: dict[int, list[Record]] = {}
        self._dirty: set[int] = set()
        self._active: BatchWriter | None = None
        self._needs_recovery = False
        self._closed = False
        # Spare journal/undo files (see _recycle), largest last. Only files this instance
        # recycled count: whatever spare/ holds when the replica is opened is removed.
        self._spares: list[tuple[int, Path]] = []
        self._spare_serial = 0
        try:
            self._clear_spares()
            for path in self._paths:
                with mapped("open image", path):
                    self._fds.append(os.open(path, open_flags(write=True)))
                with mapped("stat image", path):
                    size = os.fstat(self._fds[-1]).st_size
                want = state.disks[len(self._fds) - 1].size
                if size != want:
                    raise frproto.InternalError(f"image {path} is {size} bytes, want {want}")
            with mapped("list journal", lo.journal_dir):
                if any(n.endswith(lay.JOURNAL_SUFFIX) for n in os.listdir(lo.journal_dir)):
                    self._needs_recovery = True
        except BaseException:
            self.close()
            raise

    # -- attributes -----------------------------------------------------------------
    @property
    def vmid(self) -> UUID:
        return self._st.vmid

    @property
    def name(self) -> str:
        return self._st.name

    @property
    def disks(self) -> tuple[DiskInfo, ...]:
        return self._st.disks

    @property
    def primary(self) -> str:
        return self._st.primary

    @property
    def trust_group(self) -> str:
        return self._st.trust_group

    @property
    def generation(self) -> int:
        return self._st.generation

    @property
    def layout(self) -> lay.ReplicaLayout:
        """Where the replica's files are."""
        return self._lay

    @property
    def ir_state(self) -> IRState:
        return self._st.ir_state

    @property
    def ir_sequence(self) -> int:
        return self._st.ir_sequence

    @property
    def ir_cursor(self) -> tuple[int, int]:
        return self._st.ir_cursor

    @property
    def applied_sequence(self) -> int:
        return self._st.applied_sequence

    def __repr__(self) -> str:
        st = self._st
        return (
            f"Replica({st.vmid}, ir={st.ir_state.name}, applied_sequence={st.applied_sequence},"
            f" points={len(st.points)})"
        )

    # -- helpers ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the image descriptors (the store does this on close and delete)."""
        with self._lock:
            if self._active is not None:
                self._active.abort()
            for fd in [*self._fds, *self._direct_fds.values()]:
                os.close(fd)
            self._fds = []
            self._direct_fds = {}
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise frproto.InternalError(f"replica {self.vmid} is closed")

    def _save(self, state: _State) -> None:
        with mapped("write state", self._lay.state):
            self._io.write_file_durably(self._lay.state, state.to_bytes())
        self._st = state

    def _check_range(self, disk_index: int, offset: int, length: int) -> None:
        disks = self._st.disks
        if not 0 <= disk_index < len(disks):
            raise frproto.ChunkOutOfRange(f"disk index {disk_index} of {len(disks)} disks")
        if offset < 0 or length < 0 or offset + length > disks[disk_index].size:
            raise frproto.ChunkOutOfRange(
                f"range {offset}+{length} outside disk {disk_index} "
                f"({disks[disk_index].size} bytes)"
            )

    def _sync_images(self, indices: set[int] | range) -> None:
        # fdatasync, not fsync: an image never changes size after create, so the only
        # metadata fsync adds is the modification time, which nothing relies on; the
        # block allocation of newly written ranges is still made durable.
        for i in sorted(indices):
            with mapped("fsync image", self._paths[i]):
                self._io.fdatasync(self._fds[i], self._paths[i])

    # -- spare files ----------------------------------------------------------------------
    # A finished journal (after its batch is applied) and an undo file that no kept point
    # needs are renamed into spare/ instead of being unlinked, and the next batch renames
    # one back as its journal or undo file and writes over it. On this machine (ext4)
    # that is the largest single saving of a commit: unlinking a 100 MiB file costs
    # ~30 ms (freeing its extents, and discards at the next journal commit), and writing
    # a new file costs block allocation (~0.5 GB/s against several GB/s for overwriting
    # allocated blocks). A spare is a cache, never recovery data: nothing reads it, and
    # the replica's open (after any crash) removes every spare, so a name that a crash
    # left pointing at a file also in use elsewhere can never be reused.
    def _clear_spares(self) -> None:
        spare_dir = self._lay.checked(self._lay.spare_dir)
        with mapped("list spare files", spare_dir):
            try:
                names = os.listdir(spare_dir)
            except FileNotFoundError:
                return
            for name in names:
                self._io.unlink(self._lay.checked(spare_dir / name))

    def _take_spare(self, dest: Path, need: int) -> bool:
        """Rename the spare that best fits ``need`` bytes (the smallest one at least that
        big, else the largest) to ``dest``; False if there is none."""
        if not self._spares:
            return False
        index = next(
            (i for i, (size, _) in enumerate(self._spares) if size >= need),
            len(self._spares) - 1,
        )
        _, path = self._spares.pop(index)
        try:
            self._io.rename(path, dest)
        except OSError:
            with contextlib.suppress(OSError):
                self._io.unlink(path)
            return False
        return True

    def _recycle(self, path: Path) -> None:
        """Keep a journal or undo file that is no longer needed as a spare (or unlink it
        when there are enough). Raises ``OSError``."""
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except FileNotFoundError:
            return
        if len(self._spares) >= _MAX_SPARES:
            self._io.unlink(path)
            return
        spare_dir = self._lay.checked(self._lay.spare_dir)
        with contextlib.suppress(FileExistsError):
            spare_dir.mkdir()
        self._spare_serial += 1
        spare = spare_dir / f"{self._spare_serial}{lay.SPARE_SUFFIX}"
        self._io.rename(path, spare)
        self._spares.append((size, spare))
        self._spares.sort(key=lambda item: item[0])

    def _ensure_recovered(self) -> None:
        if self._needs_recovery:
            self._recover_journals([])

    # -- configuration ------------------------------------------------------------------
    def config_blob(self) -> bytes:
        path = self._lay.config
        with mapped("read config", path):
            fd = os.open(path, open_flags(write=False))
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    return f.read()
            finally:
                os.close(fd)

    def image_path(self, disk_index: int) -> Path:
        if not 0 <= disk_index < len(self._paths):
            raise frproto.ChunkOutOfRange(f"disk index {disk_index} of {len(self._paths)} disks")
        return self._paths[disk_index]

    # -- initial replication --------------------------------------------------------------
    def begin_ir(self, sequence: int) -> None:
        """Start or resume the IR. Resuming (state IN_PROGRESS) keeps ``ir_cursor`` when
        ``sequence`` is the same; another sequence restarts it at (0, 0)."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.ir_state == IRState.COMPLETE:
                raise frproto.AlreadyExists(f"replica {st.vmid}: initial replication is complete")
            if st.ir_state == IRState.IN_PROGRESS:
                cursor = st.ir_cursor if sequence == st.ir_sequence else (0, 0)
                new = replace(st, ir_sequence=sequence, ir_cursor=cursor, ir_resumed=True)
            else:
                new = replace(
                    st,
                    ir_state=IRState.IN_PROGRESS,
                    ir_sequence=sequence,
                    ir_cursor=(0, 0),
                    ir_resumed=False,
                )
            self._save(new)

    def _direct_fd(self, disk_index: int) -> int | None:
        """The image's O_DIRECT descriptor, opened on first use; None where the file system
        refuses O_DIRECT (tmpfs, some network file systems)."""
        fd = self._direct_fds.get(disk_index)
        if fd is None and self._direct_ok:
            path = self._paths[disk_index]
            try:
                fd = os.open(path, open_flags(write=True) | _O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise os_error(exc, "open image (O_DIRECT)", path) from exc
                self._direct_ok = False
                return None
            self._direct_fds[disk_index] = fd
        return fd

    def write_ir_chunk(
        self,
        disk_index: int,
        offset: int,
        data: Buffer | None,
        *,
        length: int | None = None,
        aligned: bool = False,
    ) -> None:
        """Write one IR chunk straight into the image (no fsync). ``data=None`` is a zero
        range of ``length`` bytes: nothing is written on a fresh IR (the image is sparse),
        a hole is punched (or zeros written) on a resumed one.

        ``aligned=True`` says ``data`` lies in page-aligned memory (an ``mmap`` buffer):
        the chunk is then written with O_DIRECT when its offset and length are multiples of
        :data:`DIRECT_ALIGN`. Safe to call from a worker thread, several at once."""
        with self._lock:
            self._check_open()
            if self._st.ir_state != IRState.IN_PROGRESS:
                raise frproto.OutOfSequence(f"replica {self.vmid}: no initial replication running")
            if data is None:
                if length is None:
                    raise ValueError("a zero range (data=None) needs length=")
                self._check_range(disk_index, offset, length)
                if self._st.ir_resumed and length:
                    path = self._paths[disk_index]
                    with mapped("zero range", path):
                        self._io.write_zeros(self._fds[disk_index], offset, length, path)
                    self._dirty.add(disk_index)
            else:
                self._check_range(disk_index, offset, len(data))
                path = self._paths[disk_index]
                with mapped("write image", path):
                    # Allocate the chunk's blocks (posix_fallocate) before writing it: on
                    # ext4 that measured ~10% faster for a 1 GiB IR of 1 MiB chunks than
                    # letting the writes into the holes allocate (0.65 against 0.72 s
                    # median). Only chunks with data are reserved, so zero chunks stay
                    # holes and the image stays sparse.
                    self._io.reserve(self._fds[disk_index], offset, len(data), path)
                    fd = self._fds[disk_index]
                    if aligned and not (offset | len(data)) % DIRECT_ALIGN:
                        # O_DIRECT skips the page cache: no copy into it, and no
                        # write-back of a gigabyte of dirty pages competing with the next
                        # chunks for the file system's locks (that made buffered IR
                        # writes cost 1-3 CPU s/GB here). The checkpoint's fdatasync
                        # still makes the allocation and the device cache durable.
                        fd = self._direct_fd(disk_index) or fd
                    self._io.pwrite(fd, data, offset, path)
                self._dirty.add(disk_index)
            self._io.crash("ir_chunk_written")

    def checkpoint_ir(self, disk_index: int, offset: int) -> None:
        """Make everything written so far durable, then record ``(disk_index, offset)`` as
        the cursor: the primary resumes from there after a restart."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.ir_state != IRState.IN_PROGRESS:
                raise frproto.OutOfSequence(f"replica {self.vmid}: no initial replication running")
            if not 0 <= disk_index <= len(st.disks) or offset < 0:
                raise frproto.ChunkOutOfRange(f"IR cursor ({disk_index}, {offset}) out of range")
            if disk_index < len(st.disks) and offset > st.disks[disk_index].size:
                raise frproto.ChunkOutOfRange(f"IR cursor ({disk_index}, {offset}) out of range")
            self._sync_images(self._dirty)
            self._dirty.clear()
            self._io.crash("ir_images_synced")
            self._save(replace(st, ir_cursor=(disk_index, offset)))
            self._io.crash("ir_checkpoint_written")

    def complete_ir(self, sequence: int) -> None:
        """Finish the IR: fsync every image, then durably mark it COMPLETE with
        ``applied_sequence = sequence`` and the first recovery point."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.ir_state != IRState.IN_PROGRESS or sequence != st.ir_sequence:
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: IR {sequence} is not the one in progress "
                    f"({st.ir_state.name}, sequence {st.ir_sequence})"
                )
            self._sync_images(range(len(self._fds)))
            self._dirty.clear()
            self._io.crash("ir_images_synced")
            point = RecoveryPoint(sequence, _now_ms(), time.time())
            self._save(
                replace(
                    st,
                    ir_state=IRState.COMPLETE,
                    ir_cursor=(len(st.disks), 0),
                    ir_resumed=False,
                    applied_sequence=sequence,
                    points=(point,),
                )
            )
            self._io.crash("ir_complete_written")

    # -- delta batches ----------------------------------------------------------------------
    def set_generation(self, generation: int) -> None:
        """Start the relationship at ``generation`` (reverse replication after a failover
        carries on the failed-over side's generation)."""
        with self._lock:
            self._check_open()
            self._save(replace(self._st, generation=generation))

    @property
    def failed_over(self) -> bool:
        """True once the VM was failed over to this site (see :meth:`fail_over`)."""
        return self._st.failed_over

    def fail_over(self, sequence: int | None = None) -> int:
        """Unplanned failover: bring the images to the kept point ``sequence`` (default:
        the latest), drop the newer points, and move the relationship to a new
        generation, marked failed over, so that the former primary is refused from now on
        (no split brain). Returns the new generation.

        Crash-safe: the decision (point, new generation, failed over) is written first;
        the images are then brought back with the newer points' undo data, newest first
        (idempotent: calling this again after a crash finishes the same revert)."""
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            st = self._st
            if st.ir_state != IRState.COMPLETE:
                raise frproto.OutOfSequence(f"replica {self.vmid}: no complete replica")
            if st.reverting_to < 0:
                target = st.applied_sequence if sequence is None else sequence
                if all(p.sequence != target for p in st.points):
                    raise frproto.OutOfSequence(
                        f"replica {self.vmid}: no recovery point {target} is kept"
                    )
                st = replace(
                    st, failed_over=True, generation=st.generation + 1, reverting_to=target
                )
                self._save(st)
            target = st.reverting_to
            newer = [p.sequence for p in st.points if p.sequence > target]
            for seq in reversed(newer):
                self._revert_batch(seq)
            self._sync_images(range(len(self._fds)))
            kept = tuple(p for p in st.points if p.sequence <= target)
            self._save(replace(st, applied_sequence=target, points=kept, reverting_to=-1))
            self._drop_undo(set(newer))
            return self._st.generation

    def _revert_batch(self, seq: int) -> None:
        """Write back what batch ``seq`` overwrote (its undo data)."""
        path = self._lay.checked(self._lay.undo(seq))
        with mapped("read undo", path):
            records = self._undo_records(seq, path)
            fd = os.open(path, open_flags(write=False))
        try:
            for rec in records:
                image = self._paths[rec.disk_index]
                with mapped("revert image", image):
                    if rec.kind == KIND_DATA:
                        data = os.pread(fd, rec.length, rec.data_pos)
                        if len(data) != rec.length:
                            raise frproto.InternalError(f"short read of {path}")
                        self._io.pwrite(self._fds[rec.disk_index], data, rec.offset, image)
                    else:
                        self._io.write_zeros(
                            self._fds[rec.disk_index], rec.offset, rec.length, image
                        )
        finally:
            os.close(fd)

    def applied_digest(self, sequence: int) -> str:
        """The aggregate digest batch ``sequence`` was applied with, if this replica still
        keeps its point and knows it ("" otherwise)."""
        with self._lock:
            for point in self._st.points:
                if point.sequence == sequence:
                    return point.digest
        return ""

    def begin_batch(self, sequence: int, base_sequence: int, captured_at_ms: int) -> BatchWriter:
        """Open the journal of batch ``sequence``, which applies on top of
        ``base_sequence``. A batch still open on this replica is aborted."""
        with self._lock:
            self._check_open()
            st = self._st
            if st.ir_state != IRState.COMPLETE:
                raise frproto.OutOfSequence(f"replica {self.vmid}: initial replication not done")
            if self._active is not None:
                self._active.abort()
            self._ensure_recovered()
            st = self._st
            if sequence <= st.applied_sequence:
                raise AlreadyApplied(sequence, st.applied_sequence)
            if base_sequence != st.applied_sequence:
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: batch {sequence} is based on {base_sequence}, "
                    f"but {st.applied_sequence} is applied"
                )
            path = self._lay.checked(self._lay.journal(sequence))
            try:
                with mapped("create journal", path):
                    # The batch's size is not known yet: take the largest spare.
                    reuse = self._take_spare(path, 1 << 62)
                    writer = FileWriter(
                        self._io,
                        path,
                        JOURNAL_MAGIC,
                        sequence,
                        base_sequence,
                        captured_at_ms,
                        reuse=reuse,
                    )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            batch = BatchWriter(self, writer, sequence, base_sequence, captured_at_ms)
            self._active = batch
            return batch

    def _write_undo(self, sequence: int, base: int, captured: int, records: list[Record]) -> None:
        """Capture what ``records`` will overwrite into ``undo/<sequence>.undo`` (durable,
        with its END record). The images must not have been touched by the batch."""
        path = self._lay.checked(self._lay.undo(sequence))
        need = sum(RECORD.size + r.length for r in records) + 2 * RECORD.size
        with mapped("write undo", path):
            reuse = self._take_spare(path, FILE_HEADER.size + need)
            # buffered: the ranges are read into one large window and written with one
            # writev per window instead of two small writes per range.
            undo = FileWriter(
                self._io, path, UNDO_MAGIC, sequence, base, captured, reuse=reuse, buffered=True
            )
            try:
                # Allocating the file in one go is several times faster than growing it
                # write by write; the zeros past the END record are never read. (On a
                # reused spare that is already big enough this allocates nothing.)
                self._io.reserve(undo.fd, 0, FILE_HEADER.size + need, path)
                window = bytearray(min(_WINDOW, max((r.length for r in records), default=0)))
                fill = 0
                for rec in records:
                    fd = self._fds[rec.disk_index]
                    if _is_hole(fd, rec.offset, rec.length):
                        undo.add_zero(rec.disk_index, rec.offset, rec.length)
                        continue
                    if fill + rec.length > len(window):
                        undo.flush()  # the queued records point into the window
                        fill = 0
                    buf, start = window, fill
                    if rec.length > len(buf):
                        buf, start = bytearray(rec.length), 0  # a range above _WINDOW
                    else:
                        fill += rec.length
                    view = memoryview(buf)[start : start + rec.length]
                    got = os.preadv(fd, [view], rec.offset)
                    if got != rec.length:
                        path_ = self._paths[rec.disk_index]
                        raise OSError(errno.EIO, "short read of image", str(path_))
                    if buf.startswith(_zeros(rec.length), start):
                        undo.add_zero(rec.disk_index, rec.offset, rec.length)
                    else:
                        undo.add_data(rec.disk_index, rec.offset, view)
                    if buf is not window:
                        undo.flush()
                undo.end()
                undo.sync()
            finally:
                undo.close()
            self._io.fsync_dir(path.parent)
        self._undo_index[sequence] = undo.records

    def _apply(
        self, src_fd: int, src_path: Path, records: list[Record], crash_name: str
    ) -> set[int]:
        """Write ``records`` (read from ``src_fd``) into the images and
        fsync the touched images. Returns the touched disk indices."""
        touched: set[int] = set()
        # The payloads follow each other in the source file, so they are read in windows
        # of up to _WINDOW bytes with one preadv and written with one pwrite each: on
        # this machine that is faster than a copy_file_range per range, which the kernel
        # runs page by page (64 KiB ranges: ~33 us each).
        data_end = max((r.data_pos + r.length for r in records if r.kind == KIND_DATA), default=0)
        window = bytearray(min(_WINDOW, data_end))
        view = memoryview(window)
        win_start = win_end = 0
        for i, rec in enumerate(records):
            path = self._paths[rec.disk_index]
            fd = self._fds[rec.disk_index]
            with mapped("apply to image", path):
                if rec.kind != KIND_DATA:
                    self._io.write_zeros(fd, rec.offset, rec.length, path)
                elif rec.length > len(window):
                    self._io.copy_range(src_fd, rec.data_pos, fd, rec.offset, rec.length, path)
                else:
                    if not win_start <= rec.data_pos <= rec.data_pos + rec.length <= win_end:
                        want = min(len(window), data_end - rec.data_pos)
                        got = os.preadv(src_fd, [view[:want]], rec.data_pos)
                        if got < rec.length:
                            raise OSError(errno.EIO, "short read", str(src_path))
                        win_start, win_end = rec.data_pos, rec.data_pos + got
                    lo = rec.data_pos - win_start
                    self._io.pwrite(fd, view[lo : lo + rec.length], rec.offset, path)
            touched.add(rec.disk_index)
            if i == 0:
                self._io.crash(crash_name)
        self._sync_images(touched)
        return touched

    def _reserve(self, records: list[Record]) -> None:
        for rec in records:
            if rec.kind == KIND_DATA and rec.length:
                path = self._paths[rec.disk_index]
                with mapped("reserve image space", path):
                    self._io.reserve(self._fds[rec.disk_index], rec.offset, rec.length, path)

    def _applied_state(
        self, sequence: int, captured_at_ms: int, digest: str = ""
    ) -> tuple[_State, set[int]]:
        """The state after applying ``sequence``, and the undo files it makes obsolete."""
        st = self._st
        before = needed_undo(st.points) | {sequence}
        point = RecoveryPoint(sequence, captured_at_ms, time.time(), digest)
        points = prune([*st.points, point], self._keep)
        obsolete = before - needed_undo(points)
        return replace(st, applied_sequence=sequence, points=tuple(points)), obsolete

    def _drop_undo(self, sequences: set[int]) -> None:
        for seq in sequences:
            self._undo_index.pop(seq, None)
            path = self._lay.undo(seq)
            with mapped("remove undo", path):
                self._recycle(path)

    def _commit(self, batch: BatchWriter) -> None:
        io = self._io
        journal = batch.journal
        seq = batch.sequence
        # 1. commit record: durable journal
        try:
            io.crash("batch_before_commit_record")
            with mapped("commit journal", journal.path):
                journal.end()
                journal.sync()
                io.fsync_dir(journal.path.parent)
        except BaseException:
            batch.abort()
            raise
        io.crash("batch_journal_committed")
        records = journal.records
        # 2. undo data and space reservation, images untouched
        try:
            self._write_undo(seq, batch.base_sequence, batch.captured_at_ms, records)
            self._reserve(records)
        except BaseException:
            self._discard_committed(batch)
            raise
        io.crash("batch_undo_written")
        # 3. apply, 4. state
        try:
            self._apply(journal.fd, journal.path, records, "batch_mid_apply")
            io.crash("batch_images_synced")
            new, obsolete = self._applied_state(seq, batch.captured_at_ms, batch.digest)
            self._save(new)
        except BaseException:
            self._roll_back(batch)
            raise
        io.crash("batch_state_written")
        # 5. cleanup (failures here leave only files recover() removes). The journal
        # leaves journal/ by a rename into spare/ rather than an unlink: either way its
        # name is gone, which is all recover() looks at.
        journal.close()
        try:
            with mapped("remove journal", journal.path):
                self._recycle(journal.path)
            io.crash("batch_journal_removed")
            self._drop_undo(obsolete)
        except frproto.ReplicationError:
            self._needs_recovery = True

    def _discard_committed(self, batch: BatchWriter) -> None:
        """Forget a committed batch whose images were never touched."""
        batch.journal.close()
        try:
            with mapped("discard journal", batch.journal.path):
                self._io.unlink(batch.journal.path)
                self._io.fsync_dir(batch.journal.path.parent)
            self._drop_undo({batch.sequence})
        except frproto.ReplicationError:
            self._needs_recovery = True

    def _roll_back(self, batch: BatchWriter) -> None:
        """Put back what a failed apply overwrote, from the (complete) undo file, then
        discard the batch. If that fails too, the committed journal stays for recover()."""
        seq = batch.sequence
        path = self._lay.undo(seq)
        try:
            with mapped("roll back from undo", path):
                fd = os.open(path, open_flags(write=False))
                try:
                    self._apply(fd, path, self._undo_index[seq], "rollback_mid_apply")
                finally:
                    os.close(fd)
        except (frproto.ReplicationError, KeyError):
            batch.journal.close()
            self._needs_recovery = True
            return
        self._discard_committed(batch)

    # -- recovery -------------------------------------------------------------------------
    def _recover_journals(self, log: list[str]) -> None:
        """Finish or discard every journal left by an interrupted commit; remove stray
        temporary, undo and journal files."""
        io = self._io
        lo = self._lay
        tag = f"replica {self.vmid}"
        with mapped("list journal", lo.journal_dir):
            names = sorted(os.listdir(lo.journal_dir))
        active = self._active.journal.path if self._active is not None else None
        for name in names:
            path = lo.checked(lo.journal_dir / name)
            if path == active:
                continue
            seq = lay.parse_seq_name(name, lay.JOURNAL_SUFFIX)
            if seq is None:
                if not name.endswith(".corrupt"):
                    with mapped("remove stray file", path):
                        io.unlink(path)
                    log.append(f"{tag}: removed stray journal file {name}")
                continue
            st = self._st
            if seq <= st.applied_sequence:
                with mapped("remove journal", path):
                    io.unlink(path)
                log.append(f"{tag}: removed journal of batch {seq}, already applied")
                continue
            with mapped("read journal", path):
                contents = read_file(path, expect_magic=JOURNAL_MAGIC)
            if contents.complete and contents.sequence <= st.applied_sequence:
                # A reused spare (see _recycle) whose new header never reached the disk
                # (power loss before the commit's fdatasync) still holds a whole journal
                # of an older, applied batch. The commit record of batch ``seq`` is only
                # durable together with its own header, so this batch never committed.
                contents.complete = False
                contents.problem = f"stale journal of batch {contents.sequence}"
            if not contents.complete:
                with mapped("discard journal", path):
                    io.unlink(path)
                    io.unlink(lo.undo(seq))
                    io.fsync_dir(lo.journal_dir)
                log.append(
                    f"{tag}: discarded uncommitted batch {seq} ({contents.problem}); "
                    f"replica stays at {st.applied_sequence}"
                )
                continue
            if contents.sequence != seq or contents.base_sequence != st.applied_sequence:
                bad = path.with_name(name + ".corrupt")
                with mapped("quarantine journal", path):
                    io.rename(path, bad)
                log.append(
                    f"{tag}: quarantined journal {name}: batch {contents.sequence} based on "
                    f"{contents.base_sequence}, but {st.applied_sequence} is applied"
                )
                continue
            self._redo(
                path, contents.records, seq, contents.base_sequence, contents.captured_at_ms, log
            )
        self._clean_files(log)
        self._needs_recovery = False

    def _redo(
        self,
        path: Path,
        records: list[Record],
        seq: int,
        base: int,
        captured: int,
        log: list[str],
    ) -> None:
        io = self._io
        lo = self._lay
        undo_path = lo.undo(seq)
        undo_ok = False
        with mapped("read undo", undo_path):
            if os.path.lexists(undo_path):
                undo = read_file(undo_path, expect_magic=UNDO_MAGIC)
                undo_ok = undo.complete and undo.sequence == seq
                if undo_ok:
                    self._undo_index[seq] = undo.records
        if not undo_ok:
            # The undo file is made durable before the first image write, so an
            # incomplete one means the images are untouched: capture it again.
            self._write_undo(seq, base, captured, records)
            io.crash("recover_undo_regenerated")
        with mapped("open journal", path):
            fd = os.open(path, open_flags(write=False))
        try:
            self._reserve(records)
            self._apply(fd, path, records, "recover_mid_apply")
        finally:
            os.close(fd)
        new, obsolete = self._applied_state(seq, captured)
        self._save(new)
        with mapped("remove journal", path):
            io.unlink(path)
        self._drop_undo(obsolete)
        log.append(
            f"replica {self.vmid}: re-applied committed batch {seq} "
            f"({len(records)} ranges, undo {'kept' if undo_ok else 'regenerated'})"
        )

    def _clean_files(self, log: list[str]) -> None:
        lo = self._lay
        keep = needed_undo(self._st.points)
        with mapped("list undo", lo.undo_dir):
            names = os.listdir(lo.undo_dir)
        for name in names:
            seq = lay.parse_seq_name(name, lay.UNDO_SUFFIX)
            if seq is not None and seq in keep:
                continue
            path = lo.checked(lo.undo_dir / name)
            with mapped("remove undo", path):
                self._io.unlink(path)
            if seq is not None:
                self._undo_index.pop(seq, None)
            if not name.endswith(lay.TMP_SUFFIX):
                log.append(f"replica {self.vmid}: removed undo file {name} (not a kept point)")
        for path in (lo.dir, lo.journal_dir):
            with mapped("list", path):
                names = os.listdir(path)
            for name in names:
                if name.endswith(lay.TMP_SUFFIX):
                    with mapped("remove temporary file", path / name):
                        self._io.unlink(lo.checked(path / name))
        present = {lay.parse_seq_name(n, lay.UNDO_SUFFIX) for n in os.listdir(lo.undo_dir)}
        missing = keep - present
        if missing:
            log.append(f"replica {self.vmid}: undo data missing for points {sorted(missing)}")

    def _recover(self) -> list[str]:
        with self._lock:
            self._check_open()
            log: list[str] = []
            self._recover_journals(log)
            st = self._st
            if st.ir_state == IRState.IN_PROGRESS:
                log.append(
                    f"replica {self.vmid}: initial replication {st.ir_sequence} in progress, "
                    f"resumes at disk {st.ir_cursor[0]} offset {st.ir_cursor[1]}"
                )
            return log

    # -- reading ----------------------------------------------------------------------------
    def recovery_points(self) -> list[RecoveryPoint]:
        return list(self._st.points)

    def read(
        self, disk_index: int, offset: int, length: int, *, at_sequence: int | None = None
    ) -> bytes:
        """``length`` bytes of a disk now, or as of the kept recovery point
        ``at_sequence`` (``frproto.OutOfSequence`` if it is not kept)."""
        with self._lock:
            self._check_open()
            self._check_range(disk_index, offset, length)
            self._ensure_recovered()
            st = self._st
            buf = bytearray(length)
            path = self._paths[disk_index]
            with mapped("read image", path):
                got = os.preadv(self._fds[disk_index], [buf], offset) if length else 0
            if got != length:
                raise frproto.InternalError(f"short read of {path} at {offset}")
            if at_sequence is None or at_sequence == st.applied_sequence:
                return bytes(buf)
            if all(p.sequence != at_sequence for p in st.points):
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: no recovery point {at_sequence} is kept"
                )
            for point in reversed(st.points):
                if point.sequence <= at_sequence:
                    break
                self._overlay_undo(point.sequence, buf, disk_index, offset)
            return bytes(buf)

    def _undo_records(self, seq: int, path: Path) -> list[Record]:
        """Batch ``seq``'s undo records (read once: an undo file never changes while its
        point is kept)."""
        records = self._undo_index.get(seq)
        if records is None:
            records = self._undo_index[seq] = read_undo(path)
        return records

    def _overlay_undo(self, seq: int, buf: bytearray, disk_index: int, offset: int) -> None:
        path = self._lay.checked(self._lay.undo(seq))
        with mapped("read undo", path):
            records = self._undo_records(seq, path)
            fd = os.open(path, open_flags(write=False))
            try:
                overlay(buf, disk_index, offset, records, fd)
            finally:
                os.close(fd)

    def digests(self, disk_index: int, offset: int, block_size: int, count: int) -> bytes:
        """XXH3-128 of ``count`` blocks from ``offset`` (the last one cut at the disk's
        end; blocks starting at or past the end are left out), concatenated. Holes are
        not read."""
        if block_size <= 0 or count < 0:
            raise frproto.BadValue(f"block size {block_size} / count {count}")
        with self._lock:
            self._check_open()
            self._check_range(disk_index, offset, 0)
            self._ensure_recovered()
            size = self._st.disks[disk_index].size
            fd = self._fds[disk_index]
            path = self._paths[disk_index]
            out = bytearray()
            buf = bytearray(min(block_size, max(size - offset, 0)))
            view = memoryview(buf)
            next_data = -1
            pos = offset
            with mapped("read image", path):
                for _ in range(count):
                    if pos >= size:
                        break
                    n = min(block_size, size - pos)
                    if next_data < pos:
                        next_data = _next_data(fd, pos, size)
                    if next_data >= pos + n:
                        out += frproto.codec.zero_digest(n)
                    else:
                        got = os.preadv(fd, [view[:n]], pos)
                        if got != n:
                            raise OSError(errno.EIO, "short read", str(path))
                        out += frproto.codec.chunk_digest(view[:n])
                    pos += n
            return bytes(out)


def _next_data(fd: int, pos: int, size: int) -> int:
    """The first offset >= ``pos`` that may hold data (``size`` if none)."""
    try:
        return os.lseek(fd, pos, _SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return pos
        raise


def _is_hole(fd: int, offset: int, length: int) -> bool:
    return _next_data(fd, offset, offset + length) >= offset + length


_ZEROS: list[bytes] = [bytes(1 << 16)]


def _zeros(n: int) -> memoryview:
    """A view of ``n`` zero bytes (``bytearray.startswith`` of it is a fast memcmp)."""
    if len(_ZEROS[0]) < n:
        _ZEROS[0] = bytes(n)
    return memoryview(_ZEROS[0])[:n]


# --------------------------------------------------------------------------------------
# batch writer


class BatchWriter:
    """The journal of one delta batch being received. ``add`` only appends to the
    journal; ``commit`` makes it durable and applies it; ``abort`` forgets it."""

    def __init__(
        self,
        replica: Replica,
        journal: FileWriter,
        sequence: int,
        base_sequence: int,
        captured_at_ms: int,
    ) -> None:
        self._replica = replica
        self.journal = journal
        self.sequence = sequence
        self.base_sequence = base_sequence
        self.captured_at_ms = captured_at_ms
        self.digest = ""
        self._done = False

    def _check(self) -> None:
        if self._done:
            raise frproto.InternalError(f"batch {self.sequence} is already finished")

    def add(
        self, disk_index: int, offset: int, data: Buffer | None, *, length: int | None = None
    ) -> None:
        """Append one range to the journal; ``data=None`` is a zero range of ``length``
        bytes. Nothing touches the images yet."""
        r = self._replica
        with r._lock:
            self._check()
            try:
                if data is None:
                    if length is None:
                        raise ValueError("a zero range (data=None) needs length=")
                    r._check_range(disk_index, offset, length)
                    with mapped("append journal", self.journal.path):
                        self.journal.add_zero(disk_index, offset, length)
                else:
                    r._check_range(disk_index, offset, len(data))
                    with mapped("append journal", self.journal.path):
                        self.journal.add_data(disk_index, offset, data)
            except BaseException:
                # a refused range or a failed append: the journal may end in a torn
                # record, so the batch cannot go on
                self.abort()
                raise
            r._io.crash("batch_record_written")

    def commit(self, digest: bytes = b"") -> None:
        """Make the batch durable and apply it to every disk; returns once the replica is
        durably at ``sequence`` (only then may the server acknowledge it). ``digest`` (the
        batch's aggregate digest) is kept with the recovery point, to check resends."""
        r = self._replica
        with r._lock:
            self._check()
            self.digest = digest.hex()
            self._done = True
            r._active = None
            r._commit(self)

    def abort(self) -> None:
        """Discard the journal (no effect after commit or abort)."""
        r = self._replica
        with r._lock:
            if self._done:
                return
            self._done = True
            if r._active is self:
                r._active = None
            self.journal.close()
            try:
                with mapped("discard journal", self.journal.path):
                    r._io.unlink(self.journal.path)
            except frproto.ReplicationError:
                r._needs_recovery = True


# --------------------------------------------------------------------------------------
# store


class ReplicaStore:
    """Every replica under ``root`` (see :mod:`node.storage.layout`)."""

    def __init__(
        self, root: Path, *, keep_points: int = 24, faults: StorageFaults | None = None
    ) -> None:
        if keep_points < 1:
            raise ValueError("keep_points must be at least 1")
        root = Path(root)
        with mapped("create storage root", root):
            root.mkdir(parents=True, exist_ok=True)
            self.root = root.resolve(strict=True)
            for sub in (lay.TOMBSTONES_DIR, lay.STAGING_DIR, lay.TRASH_DIR):
                path = lay.check_inside(self.root, self.root / sub)
                path.mkdir(exist_ok=True)
        self.keep_points = keep_points
        self._io = FileIO(faults)
        self._lock = threading.RLock()
        self._open: dict[UUID, Replica] = {}

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open replica (their descriptors)."""
        with self._lock:
            for replica in self._open.values():
                replica.close()
            self._open.clear()

    def _layout(self, vmid: UUID) -> lay.ReplicaLayout:
        if not isinstance(vmid, UUID):
            raise TypeError(f"vmid must be a UUID, not {type(vmid).__name__}")
        lo = lay.ReplicaLayout(self.root, vmid)
        lo.checked(lo.dir)
        return lo

    def exists(self, vmid: UUID) -> bool:
        """Whether the replica exists (``frproto.InternalError`` if its directory is a
        symlink or otherwise escapes the root)."""
        lo = self._layout(vmid)
        return os.path.isfile(lo.checked(lo.state))

    def is_deleted(self, vmid: UUID) -> bool:
        return os.path.lexists(lay.tombstone_path(self.root, vmid)) and not self.exists(vmid)

    def vmids(self) -> list[UUID]:
        with mapped("list storage root", self.root):
            names = os.listdir(self.root)
        out = []
        for name in sorted(names):
            vmid = lay.parse_vmid_dir(name)
            if vmid is not None and not os.path.islink(self.root / name) and self.exists(vmid):
                out.append(vmid)
        return out

    def create(
        self,
        vmid: UUID,
        *,
        name: str,
        config: bytes,
        disks: Sequence[DiskInfo],
        primary: str,
        trust_group: str,
    ) -> Replica:
        """Create a replica with sparse images of the disks' sizes; durable on return.
        Clears a tombstone left by an earlier delete of the same VMID."""
        with self._lock:
            lo = self._layout(vmid)
            if self.exists(vmid):
                raise frproto.AlreadyExists(f"replica {vmid} already exists")
            ids = [d.disk_id for d in disks]
            for disk in disks:
                lay.check_disk_id(disk.disk_id)
                if disk.size < 0:
                    raise frproto.BadValue(f"disk {disk.disk_id} has a negative size")
            if len(set(ids)) != len(ids):
                raise frproto.BadValue(f"duplicate disk ids in {ids}")
            state = _State(
                vmid=vmid,
                name=name,
                disks=tuple(DiskInfo(disk_id=d.disk_id, size=d.size) for d in disks),
                primary=primary,
                trust_group=trust_group,
            )
            staging = self.root / lay.STAGING_DIR / f"{vmid}.{uuid.uuid4().hex}"
            lay.check_inside(self.root, staging)
            io = self._io
            try:
                with mapped("create replica", staging):
                    staging.mkdir()
                    sl = lay.ReplicaLayout(staging.parent, vmid)
                    for sub in (lay.DISKS_DIR, lay.JOURNAL_DIR, lay.UNDO_DIR):
                        (staging / sub).mkdir()
                    self._write_new(staging / lay.CONFIG_FILE, config)
                    self._write_new(staging / lay.STATE_FILE, state.to_bytes())
                    for disk in state.disks:
                        path = staging / lay.DISKS_DIR / sl.image(disk.disk_id).name
                        fd = os.open(path, open_flags(write=True, create=True) | os.O_EXCL, 0o600)
                        try:
                            io.truncate(fd, disk.size, path)
                            io.fsync(fd, path)
                        finally:
                            os.close(fd)
                    for sub in (lay.DISKS_DIR, lay.JOURNAL_DIR, lay.UNDO_DIR):
                        io.fsync_dir(staging / sub)
                    io.fsync_dir(staging)
                    io.fsync_dir(staging.parent)
                    io.rename(staging, lo.dir)
                    io.fsync_dir(self.root)
                    tomb = lay.tombstone_path(self.root, vmid)
                    if os.path.lexists(tomb):
                        io.unlink(tomb)
                        io.fsync_dir(tomb.parent)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return self._open_locked(vmid)

    def _write_new(self, path: Path, data: bytes) -> None:
        fd = os.open(path, open_flags(write=True, create=True) | os.O_EXCL, 0o600)
        try:
            self._io.pwrite(fd, data, 0, path)
            self._io.fsync(fd, path)
        finally:
            os.close(fd)

    def open(self, vmid: UUID) -> Replica:
        """The replica (one shared instance per VMID); ``frproto.UnknownVM`` if absent."""
        with self._lock:
            return self._open_locked(vmid)

    def _open_locked(self, vmid: UUID) -> Replica:
        found = self._open.get(vmid)
        if found is not None:
            return found
        lo = self._layout(vmid)
        if not self.exists(vmid):
            deleted = " (deleted)" if self.is_deleted(vmid) else ""
            raise frproto.UnknownVM(f"no replica {vmid} here{deleted}")
        for sub in (lo.disks_dir, lo.journal_dir, lo.undo_dir, lo.config):
            lo.checked(sub)
        with mapped("read state", lo.state):
            fd = os.open(lo.state, open_flags(write=False))
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    raw = f.read()
            finally:
                os.close(fd)
        try:
            state = _State.from_bytes(raw)
        except (ValueError, frproto.FrprotoError) as exc:
            raise frproto.InternalError(f"state file {lo.state} is damaged: {exc}") from exc
        if state.vmid != vmid:
            raise frproto.InternalError(f"state file {lo.state} belongs to {state.vmid}")
        replica = Replica(self._io, lo, state, self.keep_points)
        self._open[vmid] = replica
        return replica

    def set_keep_points(self, keep_points: int) -> None:
        """Keep ``keep_points`` recovery points from now on (open replicas prune to it at
        their next batch)."""
        if keep_points < 1:
            raise ValueError("keep_points must be at least 1")
        with self._lock:
            self.keep_points = keep_points
            for replica in self._open.values():
                with replica._lock:
                    replica._keep = keep_points

    def forget(self, vmid: UUID) -> None:
        """Close the replica if it is open; the next :meth:`open` reads it from disk again
        (another node may have written it meanwhile: shared storage changed hands)."""
        with self._lock:
            replica = self._open.pop(vmid, None)
            if replica is not None:
                replica.close()

    def delete(self, vmid: UUID, *, tombstone: bool = True) -> None:
        """Remove the replica, leaving a tombstone (``is_deleted`` is then True).
        ``tombstone=False`` removes it without one: the replica moved to another node, it
        was not deleted."""
        with self._lock:
            lo = self._layout(vmid)
            if not self.exists(vmid):
                raise frproto.UnknownVM(f"no replica {vmid} here")
            replica = self._open.pop(vmid, None)
            if replica is not None:
                replica.close()
            io = self._io
            trash = self.root / lay.TRASH_DIR / f"{vmid}.{uuid.uuid4().hex}"
            tomb = lay.tombstone_path(self.root, vmid)
            with mapped("delete replica", lo.dir):
                if tombstone:
                    doc = json.dumps({"vmid": str(vmid), "deleted_at": time.time()}).encode()
                    io.write_file_durably(tomb, doc)
                io.rename(lo.dir, trash)
                io.fsync_dir(self.root)
                io.fsync_dir(trash.parent)
            shutil.rmtree(trash, ignore_errors=True)

    def recover(self) -> list[str]:
        """At startup: finish or discard interrupted batches of every replica and report
        interrupted IRs; remove half-created and half-deleted replicas."""
        log: list[str] = []
        with self._lock:
            for sub in (lay.STAGING_DIR, lay.TRASH_DIR):
                base = self.root / sub
                with mapped("list", base):
                    names = os.listdir(base)
                for name in names:
                    shutil.rmtree(lay.check_inside(self.root, base / name), ignore_errors=True)
                    log.append(f"removed leftover {sub}/{name}")
            for vmid in self.vmids():
                try:
                    log.extend(self._open_locked(vmid)._recover())
                except frproto.FrprotoError as exc:
                    log.append(f"replica {vmid}: recovery failed: {exc}")
        return log


__all__ = ["AlreadyApplied", "BatchWriter", "Replica", "ReplicaStore", "os_error"]

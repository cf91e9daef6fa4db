"""The replica storage engine: one replica VM's storage, and the lock that orders it.

Synchronous and thread-safe per replica (one lock each); the recovery server calls the
long operations through ``trio.to_thread``. :class:`Replica` keeps the replica's identity,
its state and its lock, checks each call against the state, and hands the work to one
object per concern, each in a module named for it:

* :mod:`node.storage.images`: the open disk images (write, zero, sync, read, digests);
* :mod:`node.storage.ir`: an initial replication (chunks, checkpoints, completion);
* :mod:`node.storage.batch`: delta batches, from the journal to the applied images;
* :mod:`node.storage.undo`: the undo data of each batch (old points, roll back, failover);
* :mod:`node.storage.recover`: finishing what an interrupted commit left;
* :mod:`node.storage.state`: ``state.json``; :mod:`node.storage.spares`: ``spare/``.

Those objects share no private state: each is handed, when the replica is opened, the
pieces it works on (the :class:`~node.storage.fileio.FileIO` seam, the layout, the
:class:`~node.storage.state.StateFile`, the :class:`~node.storage.images.ImageSet`), and
none of them takes the lock; the replica holds it around every call (a
:class:`~node.storage.batch.BatchWriter`, handed out to the server, takes it itself). The
store of all replicas is :mod:`node.storage.store`; the on-disk layout is in
:mod:`node.storage.layout`, the file formats in :mod:`node.storage.journal`, and
``docs/storage.md`` argues why a crash at any instant leaves each replica at one recovery
point.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import frproto
from frproto import DiskInfo, IRState

from . import layout as lay
from .batch import AlreadyApplied, Batches, BatchWriter
from .fileio import Buffer, FileIO, mapped, open_flags, os_error
from .images import ImageSet
from .ir import InitialReplication
from .points import RecoveryPoint
from .recover import JournalRecovery
from .spares import SpareFiles
from .state import ReplicaState, StateFile
from .undo import UndoFiles


class Replica:
    """One replica VM's storage. Obtain it from :class:`~node.storage.store.ReplicaStore`;
    one instance per VMID per store, shared by every caller."""

    def __init__(
        self, io: FileIO, lo: lay.ReplicaLayout, state: ReplicaState, keep_points: int
    ) -> None:
        self._lay = lo
        self._io = io
        self._state = StateFile(io, lo.state, state)
        self._lock = threading.RLock()
        self._closed = False
        paths = [lo.checked(lo.image(d.disk_id)) for d in state.disks]
        # Spare files are a cache of this instance: whatever spare/ holds at open goes.
        spares = SpareFiles(io, lo)
        spares.clear()
        self._images = ImageSet(io, paths, [d.size for d in state.disks])
        try:
            with mapped("list journal", lo.journal_dir):
                leftover = any(n.endswith(lay.JOURNAL_SUFFIX) for n in os.listdir(lo.journal_dir))
        except BaseException:
            self._images.close()
            raise
        self._undo = UndoFiles(io, lo, self._images, spares)
        self._ir = InitialReplication(io, self._state, self._images)
        self._batches = Batches(
            io, lo, self._lock, self._state, self._images, self._undo, spares, keep_points
        )
        self._batches.needs_recovery = leftover
        self._recovery = JournalRecovery(io, lo, self._state, self._images, self._undo)

    # -- attributes -----------------------------------------------------------------
    @property
    def vmid(self) -> UUID:
        return self._state.current.vmid

    @property
    def name(self) -> str:
        return self._state.current.name

    @property
    def disks(self) -> tuple[DiskInfo, ...]:
        return self._state.current.disks

    @property
    def primary(self) -> str:
        return self._state.current.primary

    @property
    def trust_group(self) -> str:
        return self._state.current.trust_group

    @property
    def generation(self) -> int:
        return self._state.current.generation

    @property
    def layout(self) -> lay.ReplicaLayout:
        """Where the replica's files are."""
        return self._lay

    @property
    def ir_state(self) -> IRState:
        return self._state.current.ir_state

    @property
    def ir_sequence(self) -> int:
        return self._state.current.ir_sequence

    @property
    def ir_cursor(self) -> tuple[int, int]:
        return self._state.current.ir_cursor

    @property
    def applied_sequence(self) -> int:
        """The sequence the images are durably at. A batch committed and still being
        applied (:meth:`apply_committed`) counts once it is applied; take no lock here."""
        return self._state.current.applied_sequence

    @property
    def failed_over(self) -> bool:
        """True once the VM was failed over to this site (see :meth:`fail_over`)."""
        return self._state.current.failed_over

    @property
    def direct_io(self) -> bool | None:
        """Whether aligned IR chunks are written with O_DIRECT: True once they were, False
        where the file system refuses it (tmpfs), None before the first one."""
        with self._lock:
            return self._images.direct_io

    def __repr__(self) -> str:
        st = self._state.current
        return (
            f"Replica({st.vmid}, ir={st.ir_state.name}, applied_sequence={st.applied_sequence},"
            f" points={len(st.points)})"
        )

    # -- helpers ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the image descriptors (the store does this on close and delete). A
        committed batch not applied yet is applied first (else recovery does it at the
        next open: its journal is durable)."""
        with self._lock:
            self._batches.abort_active()
            if not self._closed:
                with contextlib.suppress(frproto.ReplicationError):
                    self._batches.apply_committed()
            self._images.close()
            self._closed = True

    def set_keep_points(self, keep_points: int) -> None:
        """Keep ``keep_points`` recovery points from now on (pruned at the next batch)."""
        with self._lock:
            self._batches.keep_points = keep_points

    def _check_open(self) -> None:
        if self._closed:
            raise frproto.InternalError(f"replica {self.vmid} is closed")

    def _ensure_recovered(self) -> None:
        """Bring the replica to its last committed batch: apply the batch committed but
        not applied yet (the pipelined commit), and run recovery if a failure left a
        journal. Everything that reads the replica calls this first."""
        # A failure leaves its journal (needs_recovery): recovery tries it again below.
        with contextlib.suppress(frproto.ReplicationError):
            self._batches.apply_committed()
        if self._batches.needs_recovery:
            self._recover_journals([])
        if self._state.current.reverting_to >= 0:
            # A failover was decided but its revert failed (a full disk) or was cut short:
            # the images are part way between two points, so nothing may read them before
            # the revert is finished.
            self._finish_revert()

    def apply_committed(self) -> None:
        """Apply the batch :meth:`BatchWriter.make_durable
        <node.storage.batch.BatchWriter.make_durable>` committed, if it is not applied yet
        (no effect otherwise); returns once the replica is durably at its sequence. The
        server calls this after acknowledging the batch; a reader that comes first applies
        it itself (under the replica's lock), so none sees a batch half applied.

        A failure raises (``frproto.NoSpace``, ``frproto.InternalError``) and leaves the
        committed journal for recovery, which the next batch or read runs, and so does the
        next call of this method: a RelationshipOpen asks it for the sequence it reports
        (REP-12), and an acknowledged batch whose apply failed must be in it (or the open
        fails), never reported missing."""
        with self._lock:
            self._check_open()
            self._batches.apply_committed()
            if self._batches.needs_recovery:
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

    def update_identity(self, name: str, config: bytes) -> bool:
        """Keep a resent RelationshipCreate's VM name and config blob (a rename or a new
        configuration on the primary; docs/protocol.md REP-28), durably: the blob is
        replaced atomically (temp file, fsync, rename), then the name in the state file.
        True if either changed."""
        with self._lock:
            self._check_open()
            changed = False
            if self.config_blob() != config:
                path = self._lay.config
                with mapped("replace config", path):
                    self._io.write_file_durably(path, config)
                changed = True
            if self._state.current.name != name:
                self._state.save(replace(self._state.current, name=name))
                changed = True
            return changed

    def image_path(self, disk_index: int) -> Path:
        count = self._images.count
        if not 0 <= disk_index < count:
            raise frproto.ChunkOutOfRange(f"disk index {disk_index} of {count} disks")
        return self._images.path(disk_index)

    # -- initial replication (node.storage.ir) ------------------------------------------------
    def begin_ir(self, sequence: int) -> None:
        """Start or resume the IR. Resuming (state IN_PROGRESS) keeps ``ir_cursor`` when
        ``sequence`` is the same; another sequence restarts it at (0, 0)."""
        with self._lock:
            self._check_open()
            self._ir.begin(sequence)

    def write_ir_chunk(
        self,
        disk_index: int,
        offset: int,
        data: Buffer | None,
        *,
        length: int | None = None,
        aligned: bool = False,
        overwrite: bool = False,
    ) -> None:
        """Write one IR chunk straight into the image (no fsync). ``data=None`` is a zero
        range of ``length`` bytes: nothing is written on a fresh IR (the image is sparse),
        a hole is punched (or zeros written) on a resumed one, or when ``overwrite`` says
        that an earlier chunk of this IR may have written there (the later chunk wins).

        ``aligned=True`` says ``data`` lies in page-aligned memory (an ``mmap`` buffer):
        the chunk is then written with O_DIRECT when its offset and length are multiples of
        :data:`~node.storage.images.DIRECT_ALIGN`. Safe to call from a worker thread,
        several at once."""
        with self._lock:
            self._check_open()
            self._ir.write_chunk(disk_index, offset, data, length, aligned, overwrite)

    def checkpoint_ir(self, disk_index: int, offset: int) -> None:
        """Make everything written so far durable, then record ``(disk_index, offset)`` as
        the cursor: the primary resumes from there after a restart."""
        with self._lock:
            self._check_open()
            self._ir.checkpoint(disk_index, offset)

    def complete_ir(self, sequence: int) -> None:
        """Finish the IR: fsync every image, then durably mark it COMPLETE with
        ``applied_sequence = sequence`` and the first recovery point."""
        with self._lock:
            self._check_open()
            self._ir.complete(sequence)

    # -- relationship -------------------------------------------------------------------------
    def set_generation(self, generation: int) -> None:
        """Start the relationship at ``generation`` (reverse replication after a failover
        carries on the failed-over side's generation)."""
        with self._lock:
            self._check_open()
            self._state.save(replace(self._state.current, generation=generation))

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
            # Not _ensure_recovered(): it would finish a decided revert, and this call
            # would then decide a second failover (another generation) on top of it. An
            # acknowledged batch not applied yet is applied first: it is the latest point.
            with contextlib.suppress(frproto.ReplicationError):
                self._batches.apply_committed()
            if self._batches.needs_recovery:
                self._recover_journals([])
            st = self._state.current
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
                self._state.save(st)
            self._finish_revert()
            return self._state.current.generation

    def _finish_revert(self) -> None:
        """Bring the images back to a decided failover's point (``reverting_to``): the
        newer points' undo data, newest first, then the state. Idempotent."""
        st = self._state.current
        target = st.reverting_to
        newer = [p.sequence for p in st.points if p.sequence > target]
        for seq in reversed(newer):
            self._undo.revert(seq)
        self._images.sync_all()
        kept = tuple(p for p in st.points if p.sequence <= target)
        self._state.save(replace(st, applied_sequence=target, points=kept, reverting_to=-1))
        self._undo.drop(set(newer))

    # -- delta batches (node.storage.batch) -----------------------------------------------------
    def applied_digest(self, sequence: int) -> str:
        """The aggregate digest batch ``sequence`` was applied with, if this replica still
        keeps its point and knows it ("" otherwise)."""
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            for point in self._state.current.points:
                if point.sequence == sequence:
                    return point.digest
        return ""

    def begin_batch(self, sequence: int, base_sequence: int, captured_at_ms: int) -> BatchWriter:
        """Open the journal of batch ``sequence``, which applies on top of
        ``base_sequence``. A batch still open on this replica is aborted."""
        with self._lock:
            self._check_open()
            if self._state.current.ir_state != IRState.COMPLETE:
                raise frproto.OutOfSequence(f"replica {self.vmid}: initial replication not done")
            self._batches.abort_active()
            self._ensure_recovered()
            return self._batches.begin(sequence, base_sequence, captured_at_ms)

    # -- recovery (node.storage.recover) ------------------------------------------------------
    def _recover_journals(self, log: list[str]) -> None:
        # A batch committed and not applied is this instance's to apply (its journal is
        # open): recovery would otherwise apply it behind its back.
        with contextlib.suppress(frproto.ReplicationError):
            self._batches.apply_committed()
        active = self._batches.active
        skip = active.journal.path if active is not None else None
        self._recovery.run(log, skip=skip, keep_points=self._batches.keep_points)
        self._batches.needs_recovery = False

    def recover(self) -> list[str]:
        """Finish or discard what interrupted commits left (the store calls this at
        startup); also report an interrupted IR. Returns log lines."""
        with self._lock:
            self._check_open()
            log: list[str] = []
            self._recover_journals(log)
            target = self._state.current.reverting_to
            if target >= 0:
                self._finish_revert()
                log.append(f"replica {self.vmid}: finished the failover's revert to {target}")
            st = self._state.current
            if st.ir_state == IRState.IN_PROGRESS:
                log.append(
                    f"replica {self.vmid}: initial replication {st.ir_sequence} in progress, "
                    f"resumes at disk {st.ir_cursor[0]} offset {st.ir_cursor[1]}"
                )
            return log

    # -- reading ----------------------------------------------------------------------------
    def recovery_points(self) -> list[RecoveryPoint]:
        """The kept points, oldest first: whole, applied batches only (a batch committed
        and still being applied is listed once it is applied). Takes no lock."""
        return list(self._state.current.points)

    def read(
        self, disk_index: int, offset: int, length: int, *, at_sequence: int | None = None
    ) -> bytes:
        """``length`` bytes of a disk now, or as of the kept recovery point
        ``at_sequence`` (``frproto.OutOfSequence`` if it is not kept)."""
        with self._lock:
            self._check_open()
            self._images.check_range(disk_index, offset, length)
            self._ensure_recovered()
            st = self._state.current
            buf = self._images.read(disk_index, offset, length)
            if at_sequence is None or at_sequence == st.applied_sequence:
                return bytes(buf)
            if all(p.sequence != at_sequence for p in st.points):
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: no recovery point {at_sequence} is kept"
                )
            for point in reversed(st.points):
                if point.sequence <= at_sequence:
                    break
                self._undo.lay_over(point.sequence, buf, disk_index, offset)
            return bytes(buf)

    def digests(self, disk_index: int, offset: int, block_size: int, count: int) -> bytes:
        """XXH3-128 of ``count`` blocks from ``offset`` (the last one cut at the disk's
        end; blocks starting at or past the end are left out), concatenated. Holes are
        not read."""
        if block_size <= 0 or count < 0:
            raise frproto.BadValue(f"block size {block_size} / count {count}")
        with self._lock:
            self._check_open()
            self._images.check_range(disk_index, offset, 0)
            self._ensure_recovered()
            return self._images.digests(disk_index, offset, block_size, count)


__all__ = ["AlreadyApplied", "BatchWriter", "Replica", "os_error"]

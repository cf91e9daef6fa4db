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
from .failover_record import (
    CANCELLING,
    COMPLETING,
    FINGERPRINT_BLOCK,
    FailoverFiles,
    FailoverRecord,
)
from .fileio import Buffer, FileIO, mapped, open_flags, os_error
from .images import ImageSet
from .ir import InitialReplication
from .journal import read_undo
from .points import RecoveryPoint, needed_undo
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
        self._failover = FailoverFiles(io, lo)
        #: ``failover/`` may hold a complete or cancel to finish (checked at reads).
        self._failover_unsettled = self._failover.exists()
        #: The sequence a cancel finished since the open went back to (None: none).
        self._cancelled_from: int | None = None

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
        if self._failover_unsettled:
            self._settle_failover()

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

    def fail_over(self, sequence: int | None = None, *, planned: bool = False) -> int:
        """Failover: bring the images to the kept point ``sequence`` (default: the
        latest) and move the relationship to a new generation, marked failed over, so
        that the former primary is refused from now on (no split brain). Returns the new
        generation. The points newer than ``sequence`` are no longer listed, but are
        kept aside (``node/storage/failover_record.py``) until the failover is completed
        (:meth:`complete_failover`) or cancelled (:meth:`cancel_failover`).

        Crash-safe: the decision (point, new generation, failed over) is written first;
        then the newest point's bytes under every range the revert will write; the
        images are then brought back with the newer points' undo data, newest first
        (idempotent: calling this again after a crash finishes the same revert).
        Calling it again once failed over, for the same point (or none), returns the
        generation; another point is refused (cancel the failover first).

        ``planned``: a planned takeover at the latest state (``node/takeover.py``), noted in
        the failover record so that its former primary may repeat its request (FOV-11);
        an unplanned failover's former primary is refused whatever it presents."""
        with self._lock:
            self._check_open()
            # Not _ensure_recovered(): it would finish a decided revert, and this call
            # would then decide a second failover (another generation) on top of it. An
            # acknowledged batch not applied yet is applied first: it is the latest point.
            with contextlib.suppress(frproto.ReplicationError):
                self._batches.apply_committed()
            if self._batches.needs_recovery:
                self._recover_journals([])
            if self._failover_unsettled and self._state.current.reverting_to < 0:
                self._settle_failover()
            st = self._state.current
            if st.ir_state != IRState.COMPLETE:
                raise frproto.OutOfSequence(f"replica {self.vmid}: no complete replica")
            if st.failed_over and st.reverting_to < 0:
                if sequence is not None and sequence != st.applied_sequence:
                    raise frproto.OutOfSequence(
                        f"replica {self.vmid} is failed over at {st.applied_sequence}: "
                        f"cancel that failover before failing over to {sequence}"
                    )
                return st.generation
            if st.reverting_to < 0:
                target = st.applied_sequence if sequence is None else sequence
                # The applied sequence needs no kept point (nothing to revert): a replica
                # with its IR only, or taken over at its latest state (a planned failover).
                if target != st.applied_sequence and all(p.sequence != target for p in st.points):
                    raise frproto.OutOfSequence(
                        f"replica {self.vmid}: no recovery point {target} is kept"
                    )
                st = replace(
                    st, failed_over=True, generation=st.generation + 1, reverting_to=target
                )
                self._state.save(st)
            self._finish_revert(planned=planned)
            return self._state.current.generation

    def _finish_revert(self, *, planned: bool = False) -> None:
        """Bring the images back to a decided failover's point (``reverting_to``): the
        newest point's bytes kept first (once), then the newer points' undo data, newest
        first, set aside as it is used, then the state. Idempotent."""
        st = self._state.current
        target = st.reverting_to
        newer = [p.sequence for p in st.points if p.sequence > target]
        files = self._failover
        record = files.read()
        if record is None or record.generation != st.generation:
            # Nothing touched the images yet: the record is written only once the redo
            # data is whole, and the revert starts only after it.
            files.prepare()
            ranges = [
                rec
                for seq in newer
                for rec in self._undo.records(seq, self._lay.checked(self._lay.undo(seq)))
            ]
            self._undo.capture_file(files.redo, ranges)
            with mapped("sync failover", files.dir):
                self._io.fsync_dir(files.dir)
            files.write(
                FailoverRecord(
                    st.generation,
                    st.generation - 1,
                    st.applied_sequence,
                    target,
                    st.points,
                    planned=planned and target == st.applied_sequence,
                )
            )
            self._io.crash("failover_redo_captured")
        for seq in reversed(newer):
            aside = files.set_aside(seq)
            # Set aside before it is used: once the state lists only the points up to
            # the target, recovery would remove it from undo/.
            files.move(self._lay.undo(seq), aside)
            self._undo.revert(seq, aside)
        self._images.sync_all()
        if files.fingerprint() is None:
            files.write_fingerprint(self._fingerprint())
        kept = tuple(p for p in st.points if p.sequence <= target)
        self._state.save(replace(st, applied_sequence=target, points=kept, reverting_to=-1))
        for seq in newer:
            self._undo.forget(seq)

    def _fingerprint(self) -> bytes:
        """XXH3-128 of every ``FINGERPRINT_BLOCK`` of every disk (holes are not read)."""
        out = []
        for i, disk in enumerate(self._state.current.disks):
            count = -(-disk.size // FINGERPRINT_BLOCK)
            out.append(self._images.digests(i, 0, FINGERPRINT_BLOCK, count))
        return b"".join(out)

    def _settle_failover(self) -> None:
        """Finish a complete or cancel whose phase was written (a crash or an error cut
        it short), or remove what a failover left without a record. A failover in
        force (phase failed-over) stays as it is."""
        files = self._failover
        record = files.read() if files.exists() else None
        st = self._state.current
        if record is None:
            if files.exists() and (not st.failed_over or st.reverting_to < 0):
                files.remove()  # a complete or cancel cut short after its record went
        elif not st.failed_over or record.phase == CANCELLING:
            self._do_cancel(record)
        elif record.phase == COMPLETING:
            self._do_complete(record)
        self._failover_unsettled = False

    @property
    def failover_record(self) -> FailoverRecord | None:
        """The failover not completed nor cancelled yet (None: none)."""
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            return self._failover.read() if self._state.current.failed_over else None

    def reversed_to(self) -> str | None:
        """Where reverse replication from this failed-over replica goes, once it was set
        up (:meth:`mark_reversed`); None: not set up, or not failed over."""
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            if not self._state.current.failed_over:
                return None
            return self._failover.reversed_to()

    def mark_reversed(self, destination: str) -> None:
        """Record that reverse replication from this failed-over replica to
        ``destination`` is set up: a cancel of the failover is refused from then on (a
        completed failover keeps no record, and cannot be cancelled anyway).

        Raises:
            frproto.OutOfSequence: the replica is not failed over.
        """
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            if not self._state.current.failed_over:
                raise frproto.OutOfSequence(f"replica {self.vmid} is not failed over")
            if self._failover.read() is not None:
                self._failover.mark_reversed(destination)

    def blocks_written_since_failover(self) -> int:
        """How many 1 MiB blocks of the disks differ from the failover's fingerprint
        (what the failed-over VM wrote); 0 when there is no fingerprint."""
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            before = self._failover.fingerprint()
            if before is None:
                return 0
            now = self._fingerprint()
            size = 16
            return sum(
                1
                for at in range(0, max(len(now), len(before)), size)
                if now[at : at + size] != before[at : at + size]
            )

    def complete_failover(self) -> int:
        """Complete the failover (Hyper-V's ``Complete-VMFailover``): keep the point the
        VM was failed over to, remove every other point and what the failover kept for
        a cancel. Returns the point. Crash-safe: the phase is written first, and running
        it again (or any read, or the store's recovery) finishes it; a failover already
        completed returns its point.

        Raises:
            frproto.OutOfSequence: the replica is not failed over.
        """
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            st = self._state.current
            if not st.failed_over:
                raise frproto.OutOfSequence(f"replica {self.vmid} is not failed over")
            record = self._failover.read()
            if record is not None:
                record = self._failover.set_phase(record, COMPLETING)
                self._failover_unsettled = True
                self._io.crash("complete_decided")
                self._do_complete(record)
                self._failover_unsettled = False
            return self._state.current.applied_sequence

    def _do_complete(self, record: FailoverRecord) -> None:
        st = self._state.current
        chosen = tuple(p for p in st.points if p.sequence == st.applied_sequence)
        if st.points != chosen:
            self._state.save(replace(st, points=chosen))
            self._io.crash("complete_state_written")
        # Every undo file goes (the set-aside ones too, as spares): recovery would remove
        # those a crash here left, as no kept point needs them.
        files = self._failover
        for seq in record.newer:
            files.move(files.set_aside(seq), self._lay.undo(seq))
        self._undo.drop(needed_undo(st.points) | set(record.newer))
        self._failover.remove()

    def cancel_failover(self, *, discard_writes: bool = False) -> int:
        """Cancel a failover not completed (Hyper-V's ``Stop-VMFailover``): the replica
        goes back to where replication left it (the sequence, the points and the
        generation before the failover, not failed over), so its primary carries on.
        The VM must be stopped. Returns that sequence. Crash-safe: the phase is written
        first, and running it again (or any read, or the store's recovery) finishes it.

        The VM ran from the replica's images, and what it wrote over is not kept: if the
        disks differ from the failover's fingerprint, the cancel is refused, unless
        ``discard_writes`` (the blocks the failover reverted are put back; any other
        block the VM wrote stays as it wrote it, so verify or resynchronize after).

        Raises:
            frproto.OutOfSequence: no failover to cancel (none, or completed), or the
                VM wrote to the disks.
        """
        with self._lock:
            self._check_open()
            self._ensure_recovered()
            st = self._state.current
            record = self._failover.read()
            if not st.failed_over:
                if self._cancelled_from is not None:
                    # A cancel a crash cut short, finished since this replica was opened
                    # (by the store's recovery or a read): this call returns as it would.
                    return self._cancelled_from
                raise frproto.OutOfSequence(f"replica {self.vmid} is not failed over")
            if record is None:
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: its failover was completed; it cannot be cancelled"
                )
            if record.phase != CANCELLING:
                reversed_to = self._failover.reversed_to()
                if reversed_to is not None:
                    # The other side then holds the VM at this failover's generation: a
                    # cancel would give the former primary its writes back while the
                    # other side replicates its own, two sides writing.
                    raise frproto.OutOfSequence(
                        f"replica {self.vmid}: reverse replication to {reversed_to} has "
                        "started from it; a failover reversed cannot be cancelled (fail "
                        "back with a planned failover instead)"
                    )
            written = self.blocks_written_since_failover()
            if written and not discard_writes:
                raise frproto.OutOfSequence(
                    f"replica {self.vmid}: the failed-over VM wrote {written} blocks (1 MiB) "
                    "of its disks; a cancel cannot undo them (complete the failover, or "
                    "cancel with discard_writes and resynchronize)"
                )
            record = self._failover.set_phase(record, CANCELLING)
            self._failover_unsettled = True
            self._io.crash("cancel_decided")
            self._do_cancel(record)
            self._failover_unsettled = False
            return record.from_sequence

    def _do_cancel(self, record: FailoverRecord) -> None:
        files = self._failover
        st = self._state.current
        if st.failed_over:
            # Idempotent: the newest point's bytes where the revert wrote.
            self._undo.write_back(files.redo, read_undo(files.redo))
            self._images.sync_all()
            self._io.crash("cancel_images_restored")
            self._state.save(
                replace(
                    st,
                    applied_sequence=record.from_sequence,
                    points=record.points,
                    generation=record.from_generation,
                    failed_over=False,
                    reverting_to=-1,
                )
            )
            self._io.crash("cancel_state_written")
        for seq in record.newer:
            files.move(files.set_aside(seq), self._lay.undo(seq))
            self._undo.forget(seq)
        files.remove()
        self._cancelled_from = record.from_sequence

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
            if self._failover_unsettled:
                self._settle_failover()
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

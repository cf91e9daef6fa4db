"""Where a delta batch is received, committed and applied to a replica's images.

:meth:`BatchWriter.add` appends DATA/ZERO records to ``journal/<seq>.jrnl`` (no fsync
yet). The commit then takes these steps, each durable before the next starts (numbered as
in ``docs/storage.md``, which argues why a crash at any instant leaves the replica at one
recovery point):

1. append the END (commit) record, fsync the journal and its directory; from here on the
   batch *will* be applied, now or by recovery (:mod:`node.storage.recover`); reserve the
   ranges in the images (``posix_fallocate``), which changes no data.
   :meth:`BatchWriter.make_durable` returns here: the server acknowledges the batch
   (the *pipelined commit*), and steps 2-5 run after, off the acknowledgement path
   (:meth:`Batches.apply_committed`, which every reader of the replica runs first);
2. read the ranges the batch covers from the images into ``undo/<seq>.undo``, which gets
   its own END record and is fsynced (:meth:`node.storage.undo.UndoFiles.capture`); the
   images are still untouched;
3. write the ranges (:func:`apply_records`: the journal read back in windows, zero ranges
   punched) and fsync every touched image once;
4. replace ``state.json`` atomically with the new ``applied_sequence`` and point list;
5. move the journal, and the undo files of pruned points, to ``spare/``.

A failure before step 1 completes, or in its reservation, discards the batch (the images
are untouched, nothing acknowledged). A failure in steps 2-4 of an acknowledged batch
leaves the committed journal for recovery (:attr:`Batches.needs_recovery`: roll forward);
:meth:`BatchWriter.commit` (all five steps, nothing acknowledged in between) puts the
images back from the undo file instead, or, if that fails too, leaves the journal.

:func:`apply_records` and :func:`reserve_records` are also how recovery re-applies a
committed journal, and how the roll back writes the undo data back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import frproto

from . import layout as lay
from .fileio import Buffer, FileIO, mapped, open_flags
from .images import WINDOW, ImageSet
from .journal import JOURNAL_MAGIC, KIND_DATA, FileWriter, Record
from .spares import SpareFiles
from .state import StateFile
from .undo import UndoFiles


class AlreadyApplied(Exception):
    """The batch's sequence is not newer than ``applied_sequence``: it was applied
    before (a resend after a lost acknowledgement). The server re-acknowledges it."""

    def __init__(self, sequence: int, applied_sequence: int) -> None:
        super().__init__(f"batch {sequence} already applied (applied_sequence={applied_sequence})")
        self.sequence = sequence
        self.applied_sequence = applied_sequence


def reserve_records(images: ImageSet, records: list[Record]) -> None:
    """Allocate the image blocks of every DATA range (step 4 starts with this, so that
    ENOSPC shows while the images are untouched)."""
    for rec in records:
        if rec.kind == KIND_DATA and rec.length:
            with mapped("reserve image space", images.path(rec.disk_index)):
                images.reserve(rec.disk_index, rec.offset, rec.length)


def apply_records(
    io: FileIO,
    images: ImageSet,
    src_fd: int,
    src_path: Path,
    records: list[Record],
    crash_name: str,
) -> set[int]:
    """Write ``records`` (read from ``src_fd``, a journal or an undo file) into the images
    and fsync the touched images; ``crash_name`` is the crash point after the first
    range. Returns the touched disk indices."""
    touched: set[int] = set()
    # The payloads follow each other in the source file, so they are read in windows
    # of up to WINDOW bytes with one preadv and written with one pwrite each: on
    # this machine that is faster than a copy_file_range per range, which the kernel
    # runs page by page (64 KiB ranges: ~33 us each).
    data_end = max((r.data_pos + r.length for r in records if r.kind == KIND_DATA), default=0)
    window = bytearray(min(WINDOW, data_end))
    view = memoryview(window)
    win_start = win_end = 0
    for i, rec in enumerate(records):
        disk = rec.disk_index
        with mapped("apply to image", images.path(disk)):
            if rec.kind != KIND_DATA:
                images.write_zeros(disk, rec.offset, rec.length)
            elif rec.length > len(window):
                images.copy_range(src_fd, rec.data_pos, disk, rec.offset, rec.length)
            else:
                if not win_start <= rec.data_pos <= rec.data_pos + rec.length <= win_end:
                    want = min(len(window), data_end - rec.data_pos)
                    got = os.preadv(src_fd, [view[:want]], rec.data_pos)
                    if got < rec.length:
                        raise OSError(errno.EIO, "short read", str(src_path))
                    win_start, win_end = rec.data_pos, rec.data_pos + got
                lo = rec.data_pos - win_start
                images.pwrite(disk, view[lo : lo + rec.length], rec.offset)
        touched.add(disk)
        if i == 0:
            io.crash(crash_name)
    images.sync(touched)
    return touched


class Batches:
    """One replica's delta batches: the journal being received (:attr:`active`) and the
    commit that applies each.

    ``lock`` is the replica's lock: the replica holds it around :meth:`begin`, and a
    :class:`BatchWriter` around everything it does here."""

    def __init__(
        self,
        io: FileIO,
        lo: lay.ReplicaLayout,
        lock: threading.RLock,
        state: StateFile,
        images: ImageSet,
        undo: UndoFiles,
        spares: SpareFiles,
        keep_points: int,
    ) -> None:
        self.io = io
        self.lock = lock
        self.images = images
        self._lay = lo
        self._state = state
        self._undo = undo
        self._spares = spares
        #: Recovery points kept (older ones are pruned as each batch is applied).
        self.keep_points = keep_points
        #: The batch being received, if any.
        self.active: BatchWriter | None = None
        #: A journal was left behind (a failed cleanup, roll back or apply, or found at
        #: open): recovery must run before the next batch or read.
        self.needs_recovery = False
        #: The batch committed by :meth:`make_durable` (acknowledged, maybe) and not
        #: applied yet: :meth:`apply_committed` applies it, and everything that reads the
        #: replica calls that first, so that it sees only applied, whole batches.
        self.committed: BatchWriter | None = None

    def abort_active(self) -> None:
        if self.active is not None:
            self.active.abort()

    def begin(self, sequence: int, base_sequence: int, captured_at_ms: int) -> BatchWriter:
        """Open the journal of batch ``sequence`` on top of ``base_sequence`` (the replica
        has checked the IR and recovered; no batch is active)."""
        st = self._state.current
        if sequence <= st.applied_sequence:
            raise AlreadyApplied(sequence, st.applied_sequence)
        if base_sequence != st.applied_sequence:
            raise frproto.OutOfSequence(
                f"replica {st.vmid}: batch {sequence} is based on {base_sequence}, "
                f"but {st.applied_sequence} is applied"
            )
        path = self._lay.checked(self._lay.journal(sequence))
        try:
            with mapped("create journal", path):
                # The batch's size is not known yet: take the largest spare.
                reuse = self._spares.take(path, 1 << 62)
                writer = FileWriter(
                    self.io,
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
        self.active = batch
        return batch

    def discard(self, batch: BatchWriter) -> None:
        """Forget a batch that never committed: its journal is closed and unlinked."""
        if self.active is batch:
            self.active = None
        batch.journal.close()
        try:
            with mapped("discard journal", batch.journal.path):
                self.io.unlink(batch.journal.path)
        except frproto.ReplicationError:
            self.needs_recovery = True

    def make_durable(self, batch: BatchWriter) -> None:
        """Step 1 (and the reservation of step 2): returns once the batch is committed,
        i.e. will be applied, now or by recovery. The server may acknowledge it from
        here; the rest (:meth:`apply_committed`) runs off the acknowledgement path."""
        self.active = None
        io = self.io
        journal = batch.journal
        # 1. commit record: durable journal
        try:
            io.crash("batch_before_commit_record")
            with mapped("commit journal", journal.path):
                journal.end()
                journal.sync()
                io.fsync_dir(journal.path.parent)
        except BaseException:
            # Never acknowledged: discard it, so that the primary's resend of the same
            # sequence finds no journal in its way. (``batch.abort()`` is no help here:
            # the batch is already marked finished, and it used to leave the journal open
            # and in place.) A journal whose END record reaches the disk anyway is stale
            # by then, and recovery discards it (``recover.py``).
            self.discard(batch)
            raise
        io.crash("batch_journal_committed")
        # The images' blocks are reserved before the acknowledgement, so that ENOSPC on
        # the images refuses the batch (discarded: the images are untouched) instead of
        # leaving an acknowledged batch that cannot be applied. ``posix_fallocate`` of
        # blocks already allocated, as a replica's mostly are, is cheap.
        try:
            reserve_records(self.images, journal.records)
        except BaseException:
            self._discard_committed(batch)
            raise
        self.committed = batch

    def apply_committed(self, *, roll_back: bool = False) -> None:
        """Steps 2-5 for the batch :meth:`make_durable` committed, if any (no effect
        otherwise): returns once the replica is durably at its sequence.

        A failure here cannot discard an acknowledged batch: its journal stays and the
        replica is marked for recovery (:attr:`needs_recovery`), which applies it before
        the next batch or read. ``roll_back=True`` (:meth:`commit`, nothing acknowledged
        yet) puts the images back and discards the batch instead."""
        batch = self.committed
        if batch is None:
            return
        self.committed = None
        io = self.io
        journal = batch.journal
        seq = batch.sequence
        records = journal.records
        # 2. undo data, images untouched
        try:
            self._undo.capture(seq, batch.base_sequence, batch.captured_at_ms, records)
        except BaseException:
            if roll_back:
                self._discard_committed(batch)
            else:
                self._leave_for_recovery(batch)
            raise
        batch.undo_captured_at = time.time()
        io.crash("batch_undo_written")
        # 3. apply, 4. state
        try:
            apply_records(io, self.images, journal.fd, journal.path, records, "batch_mid_apply")
            io.crash("batch_images_synced")
            new, obsolete = self._state.current.after_batch(
                seq, batch.captured_at_ms, self.keep_points, batch.digest
            )
            self._state.save(new)
        except BaseException:
            if roll_back:
                self._roll_back(batch)
            else:
                self._leave_for_recovery(batch)
            raise
        io.crash("batch_state_written")
        # 5. cleanup (failures here leave only files recovery removes). The journal
        # leaves journal/ by a rename into spare/ rather than an unlink: either way its
        # name is gone, which is all recovery looks at.
        journal.close()
        try:
            with mapped("remove journal", journal.path):
                self._spares.recycle(journal.path)
            io.crash("batch_journal_removed")
            self._undo.drop(obsolete)
        except frproto.ReplicationError:
            self.needs_recovery = True

    def commit(self, batch: BatchWriter) -> None:
        """Steps 1-5 of the module docstring back to back; returns once the replica is
        durably at the batch's sequence. A failure leaves the replica where it was."""
        self.make_durable(batch)
        self.apply_committed(roll_back=True)

    def _leave_for_recovery(self, batch: BatchWriter) -> None:
        """An acknowledged batch whose apply failed: its committed journal stays, and
        recovery applies it (roll forward) before the next batch or read."""
        batch.journal.close()
        self.needs_recovery = True

    def _discard_committed(self, batch: BatchWriter) -> None:
        """Forget a committed batch whose images were never touched."""
        batch.journal.close()
        try:
            with mapped("discard journal", batch.journal.path):
                self.io.unlink(batch.journal.path)
                self.io.fsync_dir(batch.journal.path.parent)
            self._undo.drop({batch.sequence})
        except frproto.ReplicationError:
            self.needs_recovery = True

    def _roll_back(self, batch: BatchWriter) -> None:
        """Put back what a failed apply overwrote, from the (complete) undo file, then
        discard the batch. If that fails too, the committed journal stays for recovery."""
        seq = batch.sequence
        path = self._lay.undo(seq)
        try:
            with mapped("roll back from undo", path):
                fd = os.open(path, open_flags(write=False))
                try:
                    records = self._undo.known(seq)
                    apply_records(self.io, self.images, fd, path, records, "rollback_mid_apply")
                finally:
                    os.close(fd)
        except (frproto.ReplicationError, KeyError):
            batch.journal.close()
            self.needs_recovery = True
            return
        self._discard_committed(batch)


class BatchWriter:
    """The journal of one delta batch being received. ``add`` only appends to the
    journal; ``commit`` makes it durable and applies it; ``abort`` forgets it. Obtain it
    from :meth:`Replica.begin_batch <node.storage.replica.Replica.begin_batch>`."""

    def __init__(
        self,
        batches: Batches,
        journal: FileWriter,
        sequence: int,
        base_sequence: int,
        captured_at_ms: int,
    ) -> None:
        self._batches = batches
        self.journal = journal
        self.sequence = sequence
        self.base_sequence = base_sequence
        self.captured_at_ms = captured_at_ms
        self.digest = ""
        #: When the undo capture of the commit ended (``time.time()``; 0 before): the
        #: server logs it among the batch's timings.
        self.undo_captured_at = 0.0
        self._done = False

    def _check(self) -> None:
        if self._done:
            raise frproto.InternalError(f"batch {self.sequence} is already finished")

    def add(
        self, disk_index: int, offset: int, data: Buffer | None, *, length: int | None = None
    ) -> None:
        """Append one range to the journal; ``data=None`` is a zero range of ``length``
        bytes. Nothing touches the images yet."""
        b = self._batches
        with b.lock:
            self._check()
            try:
                if data is None:
                    if length is None:
                        raise ValueError("a zero range (data=None) needs length=")
                    b.images.check_range(disk_index, offset, length)
                    with mapped("append journal", self.journal.path):
                        self.journal.add_zero(disk_index, offset, length)
                else:
                    b.images.check_range(disk_index, offset, len(data))
                    with mapped("append journal", self.journal.path):
                        self.journal.add_data(disk_index, offset, data)
            except BaseException:
                # a refused range or a failed append: the journal may end in a torn
                # record, so the batch cannot go on
                self.abort()
                raise
            b.io.crash("batch_record_written")

    def commit(self, digest: bytes = b"") -> None:
        """Make the batch durable and apply it to every disk; returns once the replica is
        durably at ``sequence``. ``digest`` (the batch's aggregate digest) is kept with
        the recovery point, to check resends. A failure leaves the replica at the
        sequence it was at (the batch discarded)."""
        b = self._batches
        with b.lock:
            self._check()
            self.digest = digest.hex()
            self._done = True
            b.commit(self)

    def make_durable(self, digest: bytes = b"") -> None:
        """Commit the batch without applying it yet (the pipelined commit): returns once
        its journal is durable, from when on the batch will be applied, by
        :meth:`Replica.apply_committed <node.storage.replica.Replica.apply_committed>`,
        by whatever reads the replica next (it applies it first), or by recovery after a
        crash. The server acknowledges here, then applies off the acknowledgement path."""
        b = self._batches
        with b.lock:
            self._check()
            self.digest = digest.hex()
            self._done = True
            b.make_durable(self)

    def abort(self) -> None:
        """Discard the journal (no effect after commit or abort)."""
        b = self._batches
        with b.lock:
            if self._done:
                return
            self._done = True
            b.discard(self)

"""Where a replica finishes or discards what an interrupted commit left behind.

Recovery runs when the store is opened after a restart (``ReplicaStore.recover``), and
before the next batch or read of a replica whose commit failed without a crash (a
journal it could not remove or roll back). It looks only at names: every
``journal/<seq>.jrnl`` is

* removed when ``seq`` is already applied (the crash came after the state was written);
* discarded, with its undo file, when it is not complete (no valid END record: the
  batch never committed, the images were never touched);
* quarantined as ``.corrupt`` when its header names another batch or base;
* otherwise re-applied (:meth:`JournalRecovery._redo`): the undo data is captured again
  if its file is incomplete (then the images are untouched), the journal's ranges are
  written again (idempotent: the journal holds the final bytes), and the state is
  written.

Then undo files no kept point needs and temporary files are removed. Each step is
idempotent, so a crash inside recovery is covered by the same cases (``docs/storage.md``,
*Why every crash lands on one recovery point*).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import layout as lay
from .batch import apply_records, reserve_records
from .fileio import FileIO, mapped, open_flags
from .images import ImageSet
from .journal import JOURNAL_MAGIC, UNDO_MAGIC, FileContents, read_file
from .points import needed_undo
from .state import StateFile
from .undo import UndoFiles


class JournalRecovery:
    """Recovery of one replica's journal and undo directories. Not thread-safe: the
    replica's lock is held around :meth:`run`."""

    __slots__ = ("_images", "_io", "_lay", "_state", "_undo")

    def __init__(
        self,
        io: FileIO,
        lo: lay.ReplicaLayout,
        state: StateFile,
        images: ImageSet,
        undo: UndoFiles,
    ) -> None:
        self._io = io
        self._lay = lo
        self._state = state
        self._images = images
        self._undo = undo

    @property
    def _tag(self) -> str:
        return f"replica {self._state.current.vmid}"

    def run(self, log: list[str], *, skip: Path | None, keep_points: int) -> None:
        """Finish or discard every journal but ``skip`` (that of the batch being
        received); remove stray temporary, undo and journal files. Appends what it did
        to ``log``."""
        lo = self._lay
        with mapped("list journal", lo.journal_dir):
            names = sorted(os.listdir(lo.journal_dir))
        for name in names:
            path = lo.checked(lo.journal_dir / name)
            if path != skip:
                self._journal(name, path, log, keep_points)
        self._clean_files(log)

    def _journal(self, name: str, path: Path, log: list[str], keep_points: int) -> None:
        io = self._io
        tag = self._tag
        seq = lay.parse_seq_name(name, lay.JOURNAL_SUFFIX)
        if seq is None:
            if not name.endswith(".corrupt"):
                with mapped("remove stray file", path):
                    io.unlink(path)
                log.append(f"{tag}: removed stray journal file {name}")
            return
        st = self._state.current
        if seq <= st.applied_sequence:
            with mapped("remove journal", path):
                io.unlink(path)
            log.append(f"{tag}: removed journal of batch {seq}, already applied")
            return
        with mapped("read journal", path):
            contents = read_file(path, expect_magic=JOURNAL_MAGIC)
        if contents.complete and contents.sequence <= st.applied_sequence:
            # A reused spare (see node.storage.spares) whose new header never reached the
            # disk (power loss before the commit's fdatasync) still holds a whole journal
            # of an older, applied batch. The commit record of batch ``seq`` is only
            # durable together with its own header, so this batch never committed.
            contents.complete = False
            contents.problem = f"stale journal of batch {contents.sequence}"
        if not contents.complete:
            with mapped("discard journal", path):
                io.unlink(path)
                io.unlink(self._lay.undo(seq))
                io.fsync_dir(self._lay.journal_dir)
            log.append(
                f"{tag}: discarded uncommitted batch {seq} ({contents.problem}); "
                f"replica stays at {st.applied_sequence}"
            )
            return
        if contents.sequence != seq or contents.base_sequence != st.applied_sequence:
            bad = path.with_name(name + ".corrupt")
            with mapped("quarantine journal", path):
                io.rename(path, bad)
            log.append(
                f"{tag}: quarantined journal {name}: batch {contents.sequence} based on "
                f"{contents.base_sequence}, but {st.applied_sequence} is applied"
            )
            return
        self._redo(path, contents, log, keep_points)

    def _redo(self, path: Path, journal: FileContents, log: list[str], keep_points: int) -> None:
        """Re-apply the committed ``journal`` at ``path`` (its batch is the next one)."""
        io = self._io
        seq, records = journal.sequence, journal.records
        base, captured = journal.base_sequence, journal.captured_at_ms
        undo_path = self._lay.undo(seq)
        undo_ok = False
        with mapped("read undo", undo_path):
            if os.path.lexists(undo_path):
                undo = read_file(undo_path, expect_magic=UNDO_MAGIC)
                undo_ok = undo.complete and undo.sequence == seq
                if undo_ok:
                    self._undo.remember(seq, undo.records)
        if not undo_ok:
            # The undo file is made durable before the first image write, so an
            # incomplete one means the images are untouched: capture it again.
            self._undo.capture(seq, base, captured, records)
            io.crash("recover_undo_regenerated")
        with mapped("open journal", path):
            fd = os.open(path, open_flags(write=False))
        try:
            reserve_records(self._images, records)
            apply_records(io, self._images, fd, path, records, "recover_mid_apply")
        finally:
            os.close(fd)
        new, obsolete = self._state.current.after_batch(seq, captured, keep_points)
        self._state.save(new)
        with mapped("remove journal", path):
            io.unlink(path)
        self._undo.drop(obsolete)
        log.append(
            f"{self._tag}: re-applied committed batch {seq} "
            f"({len(records)} ranges, undo {'kept' if undo_ok else 'regenerated'})"
        )

    def _clean_files(self, log: list[str]) -> None:
        """Remove undo files of no kept point, and temporary files; report kept points
        whose undo data is missing."""
        lo = self._lay
        keep = needed_undo(self._state.current.points)
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
                self._undo.forget(seq)
            if not name.endswith(lay.TMP_SUFFIX):
                log.append(f"{self._tag}: removed undo file {name} (not a kept point)")
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
            log.append(f"{self._tag}: undo data missing for points {sorted(missing)}")

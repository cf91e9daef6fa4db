"""Where finished journal and undo files wait to be written over by the next batch.

A finished journal (after its batch is applied) and an undo file that no kept point
needs are renamed into ``spare/`` instead of being unlinked, and the next batch renames
one back as its journal or undo file and writes over it. On this machine (ext4) that is
the largest single saving of a commit: unlinking a 100 MiB file costs ~30 ms (freeing its
extents, and discards at the next journal commit), and writing a new file costs block
allocation (~0.5 GB/s against several GB/s for overwriting allocated blocks).

A spare is a cache, never recovery data: nothing reads it, and the replica's open (after
any crash) removes every spare, so a name that a crash left pointing at a file also in
use elsewhere can never be reused. ``docs/storage.md`` (*Spare files*) argues why an old
file's bytes past the new records are never taken for records.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

from . import layout as lay
from .fileio import FileIO, mapped

#: Spare journal/undo files kept for reuse per replica: a commit frees one journal and,
#: once the point list is full, one undo file, and the next batch takes one of each.
MAX_SPARES: Final = 2


class SpareFiles:
    """One replica's ``spare/`` directory. Only files this instance recycled count:
    :meth:`clear` (at the replica's open) removes whatever was there before."""

    __slots__ = ("_io", "_lay", "_serial", "_spares")

    def __init__(self, io: FileIO, lo: lay.ReplicaLayout) -> None:
        self._io = io
        self._lay = lo
        self._spares: list[tuple[int, Path]] = []  # (size, path), largest last
        self._serial = 0

    def clear(self) -> None:
        """Remove every file in ``spare/``."""
        spare_dir = self._lay.checked(self._lay.spare_dir)
        with mapped("list spare files", spare_dir):
            try:
                names = os.listdir(spare_dir)
            except FileNotFoundError:
                return
            for name in names:
                self._io.unlink(self._lay.checked(spare_dir / name))

    def take(self, dest: Path, need: int) -> bool:
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

    def recycle(self, path: Path) -> None:
        """Keep a journal or undo file that is no longer needed as a spare (or unlink it
        when there are enough). Raises ``OSError``."""
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except FileNotFoundError:
            return
        if len(self._spares) >= MAX_SPARES:
            self._io.unlink(path)
            return
        spare_dir = self._lay.checked(self._lay.spare_dir)
        with contextlib.suppress(FileExistsError):
            self._io.mkdir(spare_dir)
        self._serial += 1
        spare = spare_dir / f"{self._serial}{lay.SPARE_SUFFIX}"
        self._io.rename(path, spare)
        self._spares.append((size, spare))
        self._spares.sort(key=lambda item: item[0])

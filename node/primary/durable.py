"""The primary's durable-write seam: every system call that changes its files on disk
(the pending log's cycle files, the VM state and digest maps) goes through the
:class:`FileOps` in force, so that the power-loss tests can record them and build every
disk state a power cut may leave (``frtesting.powerloss``, ``docs/storage.md``).

Production uses :class:`OSFiles` (plain ``os`` calls). A test swaps the layer for a
block of code with :func:`using`; it is a context variable, so it follows the code into
``trio.to_thread`` workers (Trio runs them in a copy of the caller's context) and never
leaks into other tasks or threads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Protocol

from node.writeback import start_writeback

Buffer = bytes | bytearray | memoryview


class FileOps(Protocol):
    """What the primary asks of the file system; the methods raise ``OSError``. The
    storage engine's ``node.storage.fileio.FileIO`` has the same shape."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int: ...

    def writev(self, fd: int, parts: list[Buffer], path: Path) -> None: ...

    def truncate(self, fd: int, size: int, path: Path) -> None: ...

    def start_writeback(self, fd: int, offset: int, length: int, path: Path) -> None: ...

    def fsync(self, fd: int, path: Path) -> None: ...

    def fsync_dir(self, path: Path) -> None: ...

    def rename(self, src: Path, dst: Path) -> None: ...

    def unlink(self, path: Path, *, missing_ok: bool = True) -> None: ...

    def mkdir(self, path: Path, *, exist_ok: bool = False) -> None: ...

    def remove_tree(self, path: Path) -> None: ...


class OSFiles:
    """The real system calls."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def writev(self, fd: int, parts: list[Buffer], path: Path) -> None:
        """Append every byte of ``parts`` at the file position (loops on short writes)."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        done = os.writev(fd, views)
        while done < total:
            skip = done
            rest = []
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                rest.append(v[skip:])
                skip = 0
            views = rest
            total -= done
            done = os.writev(fd, views)

    def truncate(self, fd: int, size: int, path: Path) -> None:
        os.ftruncate(fd, size)

    def start_writeback(self, fd: int, offset: int, length: int, path: Path) -> None:
        """Start writing a range to disk, no wait (a hint; see node/writeback.py)."""
        start_writeback(fd, offset, length)

    def fsync(self, fd: int, path: Path) -> None:
        os.fsync(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path, *, missing_ok: bool = True) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, path: Path, *, exist_ok: bool = False) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not exist_ok or not path.is_dir():
                raise

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


_OS_FILES: FileOps = OSFiles()
_current: ContextVar[FileOps | None] = ContextVar("frrep_primary_files", default=None)


def files() -> FileOps:
    """The file layer in force."""
    return _current.get() or _OS_FILES


@contextlib.contextmanager
def using(ops: FileOps) -> Iterator[FileOps]:
    """Run a block with ``ops`` as the primary's file layer (tests)."""
    token = _current.set(ops)
    try:
        yield ops
    finally:
        _current.reset(token)


def makedirs(path: Path) -> None:
    """``mkdir -p`` through the layer, durably: each new directory's entry is synced in
    its parent (POSIX keeps a new name only once its directory is synced; without it a
    VM enabled just before a power cut could lose its whole directory)."""
    missing: Sequence[Path] = [p for p in (path, *path.parents) if not p.exists()]
    io = files()
    for p in reversed(missing):
        io.mkdir(p, exist_ok=True)
    for p in reversed(missing):
        io.fsync_dir(p.parent)

"""The I/O seam of the replica storage engine, and its fault-injection hooks.

Every system call that changes what is on disk (write, truncate, fsync, rename, unlink,
hole punching) goes through :class:`FileIO`, so that a test can make any of them fail
(``StorageFaults.before_write`` raising ``OSError(ENOSPC)``, ``before_sync`` raising
``OSError(EIO)``) or kill the process at a named point of the commit and checkpoint paths
(``StorageFaults.crash_point``; the names are listed in :data:`CRASH_POINTS`).

``OSError`` never escapes this module's callers as such: :func:`os_error` turns ENOSPC and
EDQUOT into :class:`frproto.NoSpace` and every other errno into
:class:`frproto.InternalError`, with the operation and the path in their ``detail``
(logged, never sent to a peer: docs/protocol.md ERR-11).

Writes use ``os.pwrite``/``os.writev`` on descriptors the caller keeps open; nothing here
copies the payload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import frproto
from node.writeback import start_writeback

Buffer = bytes | bytearray | memoryview

#: Every name passed to ``StorageFaults.crash_point``, in the order a batch or an IR meets
#: them. Tests iterate over this tuple to die at each of them.
CRASH_POINTS: Final[tuple[str, ...]] = (
    # StorageFaults.crash_point is also called with "state_tmp_synced" inside every
    # atomic state write (temp file durable, not yet renamed).
    "state_tmp_synced",
    # BatchWriter.add / commit
    "batch_record_written",
    "batch_before_commit_record",
    "batch_journal_committed",
    "batch_undo_written",
    "batch_mid_apply",
    "batch_images_synced",
    "batch_state_written",
    "batch_journal_removed",
    # a failed apply putting the images back from the undo file
    "rollback_mid_apply",
    # ReplicaStore.recover
    "recover_undo_regenerated",
    "recover_mid_apply",
    # IR
    "ir_chunk_written",
    "ir_images_synced",
    "ir_checkpoint_written",
    "ir_complete_written",
    # Replica.fail_over / complete_failover / cancel_failover
    "failover_redo_captured",
    "complete_decided",
    "complete_state_written",
    "cancel_decided",
    "cancel_images_restored",
    "cancel_state_written",
)

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_ZERO_BLOCK: Final = bytes(1 << 20)


@dataclass(slots=True)
class StorageFaults:
    """Fault-injection hooks; each is optional and costs one ``is None`` test when unset.

    * ``before_write(path, nbytes)``: called before every write, truncate or hole punch
      (``nbytes`` is the size of the range). Raise ``OSError`` to fail it.
    * ``before_sync(path)``: called before every fsync of a file or directory, and before
      every rename and unlink.
    * ``crash_point(name)``: called at the named points of :data:`CRASH_POINTS`; a test
      worker calls ``os.kill(os.getpid(), SIGKILL)`` there.
    * ``before_open(path)``: called before every open through the seam (a file the
      engine writes through, or creates) and every mkdir.
    """

    before_write: Callable[[Path, int], None] | None = None
    before_sync: Callable[[Path], None] | None = None
    crash_point: Callable[[str], None] | None = None
    before_open: Callable[[Path], None] | None = None


def os_error(exc: OSError, operation: str, path: Path | str) -> frproto.ReplicationError:
    """The frproto error that reports ``exc`` (raised by ``operation`` on ``path``)."""
    text = f"{operation} {path}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The path is for the log only (ERR-11): the peer is told that storage is full.
        return frproto.NoSpace("no space left on the storage location", detail=text)
    return frproto.InternalError(f"storage failure: {operation}", detail=text)


class mapped:
    """Run a block, turning an ``OSError`` into :func:`os_error`'s frproto error.

    A class, not a ``contextlib.contextmanager`` generator: it runs once per chunk of a
    batch (the journal's appends), where a generator's set-up cost as much as the rest of
    the bookkeeping."""

    __slots__ = ("operation", "path")

    def __init__(self, operation: str, path: Path | str) -> None:
        self.operation = operation
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, OSError):
            raise os_error(exc, self.operation, self.path) from exc


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int

    def call(fd: int, mode: int, offset: int, length: int) -> int:
        return int(func(fd, mode, offset, length))

    return call


_fallocate = _load_fallocate()


class FileIO:
    """The storage engine's system calls, with the fault hooks applied.

    Methods raise ``OSError`` (callers wrap them in :func:`mapped`), except
    :meth:`crash`, which only calls the hook.
    """

    __slots__ = ("_faults", "punch_supported")

    def __init__(self, faults: StorageFaults | None) -> None:
        self._faults = faults
        self.punch_supported = _fallocate is not None

    # The hooks are looked up on every call, so a test may change them on the fly.
    def _before_write(self, path: Path, nbytes: int) -> None:
        f = self._faults
        if f is not None and f.before_write is not None:
            f.before_write(path, nbytes)

    def _before_sync(self, path: Path) -> None:
        f = self._faults
        if f is not None and f.before_sync is not None:
            f.before_sync(path)

    # -- crash points -------------------------------------------------------------
    def crash(self, name: str) -> None:
        f = self._faults
        if f is not None and f.crash_point is not None:
            f.crash_point(name)

    # -- writes -------------------------------------------------------------------
    def pwrite(self, fd: int, data: Buffer, offset: int, path: Path) -> None:
        """Write all of ``data`` at ``offset`` (loops on short writes)."""
        self._before_write(path, len(data))
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        done = os.pwrite(fd, view, offset)
        total = len(view)
        while done < total:
            done += os.pwrite(fd, memoryview(view)[done:], offset + done)

    def writev(self, fd: int, parts: list[Buffer], path: Path) -> None:
        """Append ``parts`` at the file position (loops on short writes)."""
        total = sum(map(len, parts))
        self._before_write(path, total)
        done = os.writev(fd, parts)
        if done < total:
            rest = b"".join(bytes(p) for p in parts)[done:]
            while rest:
                n = os.write(fd, rest)
                rest = rest[n:]

    def write_zeros(self, fd: int, offset: int, length: int, path: Path) -> None:
        """Make ``[offset, offset+length)`` zeros: punch a hole, or write zeros."""
        if length <= 0:
            return
        self._before_write(path, length)
        if self.punch_supported and _fallocate is not None:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if _fallocate(fd, mode, offset, length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err), str(path))
            self.punch_supported = False
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZERO_BLOCK))
            offset += os.pwrite(fd, memoryview(_ZERO_BLOCK)[:n], offset)

    def copy_range(
        self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, path: Path
    ) -> None:
        """Copy ``length`` bytes between files in the kernel (``copy_file_range``), or
        through a buffer where the kernel refuses (``path`` names the destination)."""
        self._before_write(path, length)
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(
                    src_fd, dst_fd, length - done, src_offset + done, dst_offset + done
                )
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        while done < length:
            data = os.pread(src_fd, min(length - done, 1 << 22), src_offset + done)
            if not data:
                raise OSError(errno.EIO, "short read while copying", str(path))
            self.pwrite(dst_fd, data, dst_offset + done, path)
            done += len(data)

    def reserve(self, fd: int, offset: int, length: int, path: Path) -> None:
        """Allocate blocks for a range without changing its content (``posix_fallocate``),
        so that the writes that follow cannot fail for lack of space."""
        self._before_write(path, length)
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise

    def truncate(self, fd: int, size: int, path: Path) -> None:
        self._before_write(path, 0)
        os.ftruncate(fd, size)

    # -- names ---------------------------------------------------------------------
    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        """``os.open`` for a descriptor the engine will write through (or a file it
        creates): the power-loss layer (``frtesting.powerloss``) learns here which file a
        descriptor names and whether the open created it."""
        f = self._faults
        if f is not None and f.before_open is not None:
            f.before_open(path)
        return os.open(path, flags, mode)

    def mkdir(self, path: Path, *, exist_ok: bool = False) -> None:
        """Create a directory (durable only once its parent is synced)."""
        f = self._faults
        if f is not None and f.before_open is not None:
            f.before_open(path)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not exist_ok or not path.is_dir():
                raise

    def remove_tree(self, path: Path) -> None:
        """Remove a directory and everything under it, ignoring errors (a half-created or
        half-deleted replica that nothing reads any more)."""
        shutil.rmtree(path, ignore_errors=True)

    # -- durability and names ------------------------------------------------------
    def fsync(self, fd: int, path: Path) -> None:
        self._before_sync(path)
        os.fsync(fd)

    def start_writeback(self, fd: int, offset: int, length: int, path: Path) -> None:
        """:func:`start_writeback` (changes nothing a power cut could see)."""
        start_writeback(fd, offset, length)

    def fdatasync(self, fd: int, path: Path) -> None:
        """Make a file's data durable, and the metadata needed to read it back (size,
        block allocation); unlike :meth:`fsync` it skips a pure timestamp update, which
        saves an inode write and a journal commit when a write did not grow the file
        (an image or a reused journal/undo file)."""
        self._before_sync(path)
        os.fdatasync(fd)

    def fsync_dir(self, path: Path) -> None:
        self._before_sync(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        self._before_sync(dst)
        os.rename(src, dst)

    def unlink(self, path: Path, *, missing_ok: bool = True) -> None:
        self._before_sync(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def write_file_durably(self, path: Path, data: bytes, *, tmp_suffix: str = ".tmp") -> None:
        """Atomically replace ``path`` with ``data``: temp file, fsync, rename, fsync dir."""
        tmp = path.with_name(path.name + tmp_suffix)
        fd = self.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            self.pwrite(fd, data, 0, tmp)
            self.fsync(fd, tmp)
        finally:
            os.close(fd)
        self.crash("state_tmp_synced")
        self.rename(tmp, path)
        self.fsync_dir(path.parent)


def open_flags(*, write: bool, create: bool = False) -> int:
    """``os.open`` flags for a storage file: never follows a symlink, close-on-exec."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR if write else os.O_RDONLY
    if create:
        flags |= os.O_CREAT
    return flags

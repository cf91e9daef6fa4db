"""Starting the write-back of a file's dirty pages to disk early, without waiting.

A file written as a stream and synced at its end (a delta batch's journal on the
recovery server, a pending cycle on the primary) used to leave all of its data for the
sync: the kernel writes dirty pages back late, so the sync waited for the whole 100 MiB.
Asking for the write-back of each few MiB as they are written puts the disk to work while
the rest arrives; the sync then waits for the tail only (bench/delta.py, issue 16: the
journal's sync 39-62 ms -> 9-11 ms). It is only a hint: durability still comes from the
sync alone, so crash arguments do not change (and the power-loss layer ignores it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

__all__ = ["start_writeback"]

#: sync_file_range(2)'s "start writing back, do not wait".
_SYNC_FILE_RANGE_WRITE: Final = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int

    def call(fd: int, offset: int, length: int, flags: int) -> int:
        return int(func(fd, offset, length, flags))

    return call


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range's dirty pages to disk, without waiting (a
    hint: a sync still decides durability). Does nothing where sync_file_range(2) is
    missing (not Linux)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # errors: only a hint

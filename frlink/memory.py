"""Handing memory freed by closed connections back to the system.

glibc's allocator keeps the memory a process frees in its arenas (and raises its mmap
threshold after a large block is freed, so later large buffers come from the arenas
too): after a burst of connections closes, a process stays at its peak size although
Python freed everything. ``malloc_trim(0)`` returns the free pages of every arena to
the system. Elsewhere (musl, macOS) there is no such call and :func:`trim` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

from frproto.trio_io import FRAME_POOL


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        function = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim(*, idle: bool = False) -> bool:
    """Return the allocator's free memory to the system; True if it could be asked.

    ``idle``: no connection is open (on this listener): the pooled buffers are dropped
    too, and objects kept only by reference cycles (an exception's traceback holding a
    connection's frames) collected first. Takes about a millisecond on a heap of a few
    hundred MB (tens with ``idle``): callers throttle it (:class:`frlink.connections.Gate`).
    """
    if idle:
        from .biotls import REFILL_POOL  # here: biotls is heavier than this module

        FRAME_POOL.clear()
        REFILL_POOL.clear()
        gc.collect()
    function = _malloc_trim()
    if function is None:
        return False
    function(0)
    return True

"""The receive buffer: bytes in, whole frames out, without re-slicing the tail.

Data arrives in pieces of any size. Two modes keep copies to a minimum:

* *view mode*: when a piece arrives and nothing is pending, we keep a ``memoryview`` of
  the caller's object and hand frames out as slices of it. A caller (like
  ``frproto.trio_io``) that passes one whole frame per call therefore never has the
  payload copied.
* *accumulate mode*: a frame that spans pieces is assembled in a ``bytearray``. When a
  Chunk frame completes there, the bytearray itself is handed out (as a view) and a new
  one starts, so a large payload is never copied a second time.

Consumed bytes at the front of the bytearray are dropped in amortised O(1) (``del`` once
at least half is consumed), never by slicing the rest into a new object.

The caller must not modify a buffer after passing it in until the events that came from
it have been consumed (views of it may be inside those events).
"""

from __future__ import annotations

from ._wire import ENVELOPE, Bytes
from .limits import ENVELOPE_SIZE


class ReceiveBuffer:
    """Unconsumed received bytes, in view mode or accumulate mode (see module docstring)."""

    __slots__ = ("_acc", "_acc_pos", "_view", "_view_pos")

    def __init__(self) -> None:
        self._acc = bytearray()
        self._acc_pos = 0
        self._view: memoryview | None = None
        self._view_pos = 0

    def __len__(self) -> int:
        if self._view is not None:
            return len(self._view) - self._view_pos
        return len(self._acc) - self._acc_pos

    def feed(self, data: Bytes) -> None:
        """Add received bytes (the object is referenced, not copied, when possible)."""
        view = memoryview(data)
        kind = type(data)
        if kind is not bytes and kind is not bytearray and (view.ndim != 1 or view.format != "B"):
            view = view.cast("B")
        if not len(view):
            return
        if self._view is not None:
            pending = len(self._view) - self._view_pos
        else:
            pending = len(self._acc) - self._acc_pos
        if not pending:  # (len(self), inlined: this runs once per frame)
            self._view, self._view_pos = view, 0
            self._acc.clear()
            self._acc_pos = 0
            return
        if self._view is not None:
            # A partial frame is left in the view: only that tail moves to the accumulator.
            self._acc = bytearray(self._view[self._view_pos :])
            self._acc_pos = 0
            self._view = None
        elif self._acc_pos and self._acc_pos * 2 >= len(self._acc):
            del self._acc[: self._acc_pos]
            self._acc_pos = 0
        self._acc += view

    def peek_envelope(self) -> tuple[int, int, int] | None:
        """(reserved, tag, length) of the next frame, or None with fewer than 8 bytes."""
        view = self._view
        if view is not None:  # (len(self), inlined: this runs once per frame)
            if len(view) - self._view_pos < ENVELOPE_SIZE:
                return None
            return ENVELOPE.unpack_from(view, self._view_pos)
        if len(self._acc) - self._acc_pos < ENVELOPE_SIZE:
            return None
        return ENVELOPE.unpack_from(self._acc, self._acc_pos)

    def take_bytes(self, size: int) -> bytes:
        """Consume ``size`` bytes and return a copy (for small control frames)."""
        view = self._view
        if view is not None:
            start = self._view_pos
            self._view_pos += size
            if self._view_pos == len(view):
                self._view, self._view_pos = None, 0
            return bytes(view[start : start + size])
        start = self._acc_pos
        self._acc_pos += size
        out = bytes(self._acc[start : self._acc_pos])
        if self._acc_pos == len(self._acc):
            self._acc.clear()
            self._acc_pos = 0
        return out

    def take_view(self, size: int, skip: int = 0) -> memoryview:
        """Consume ``size`` bytes; return all but the first ``skip`` as a view, uncopied."""
        if self._view is None:
            # Hand the accumulator over as the view; the next piece starts a new one.
            self._view, self._view_pos = memoryview(self._acc), self._acc_pos
            self._acc = bytearray()
            self._acc_pos = 0
        view = self._view
        start = self._view_pos
        self._view_pos += size
        if self._view_pos == len(view):
            # Let go of a fully consumed piece: its owner may then reuse it once the
            # returned view is gone (frproto.trio_io reuses its frame buffers).
            self._view, self._view_pos = None, 0
        return view[start + skip : start + size]

    def take_all(self) -> bytes:
        """Consume and return everything (what is left at end of stream)."""
        return self.take_bytes(len(self))

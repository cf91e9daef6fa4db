"""Which bytes of a replica's disks an initial replication (IR) has covered.

The recovery server completes an IR only when its chunks, from the resume point on,
covered every byte of every disk (REP-32): a chunk may come in any order and overlap
others (CHK-19), and a ZERO chunk covers its range as much as a data chunk does. The
disks are seen as one line of positions, disk after disk (a chunk lies inside one disk,
CHK-14): the *frontier* is the end of the covered range that starts at the resume point,
and ranges received beyond it wait in a heap until the frontier reaches them. The
frontier, as (disk index, offset), is the resume point the server may record (REP-13):
everything before it was received (and, once the writes are drained, written). Chunks in
ascending order, as a primary sends them (MSG-27), keep the heap empty.

The out-of-band import (:mod:`node.oob_import`) checks the same thing more strictly: an
export file covers every disk in order.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from itertools import accumulate


class IRCoverage:
    """The coverage of one IR, from its resume point ``resume`` (disk index, offset)."""

    __slots__ = ("_bases", "_high", "_pending", "frontier", "total")

    def __init__(self, sizes: Sequence[int], resume: tuple[int, int] = (0, 0)) -> None:
        #: The position of the first byte of each disk, and the end of the last one.
        self._bases = [0, *accumulate(sizes)]
        self.total = self._bases[-1]
        #: Everything before this position is covered.
        self.frontier = self.position(*resume)
        #: The largest end of a chunk received so far (a chunk that starts before it
        #: may overlap an earlier one).
        self._high = 0
        self._pending: list[tuple[int, int]] = []

    def position(self, disk_index: int, offset: int) -> int:
        """The position of (disk index, offset) on the line (``(k, 0)`` is the end;
        ``(d, size(d))`` is the same as ``(d + 1, 0)``)."""
        if not 0 <= disk_index < len(self._bases) or offset < 0:
            raise ValueError(f"({disk_index}, {offset}) is not a point of the disks")
        return min(self._bases[disk_index] + offset, self.total)

    def point(self, position: int) -> tuple[int, int]:
        """(disk index, offset) of ``position``: the end of a disk is the start of the
        next one, and the end of the last one is ``(k, 0)``."""
        disk = bisect.bisect_right(self._bases, position) - 1
        if disk >= len(self._bases) - 1:
            return (len(self._bases) - 1, 0)
        return (disk, position - self._bases[disk])

    def add(self, disk_index: int, offset: int, length: int) -> bool:
        """Account for a chunk; True if it may overlap a chunk received before it in
        this IR (its start is before the end of one received earlier), so that its
        write must wait for theirs (CHK-25: the later chunk wins)."""
        start = self._bases[disk_index] + offset
        end = start + length
        overlaps = start < self._high
        self._high = max(self._high, end)
        if start <= self.frontier:
            if end > self.frontier:
                self.frontier = end
                pending = self._pending
                while pending and pending[0][0] <= self.frontier:
                    self.frontier = max(self.frontier, heapq.heappop(pending)[1])
        else:
            heapq.heappush(self._pending, (start, end))
        return overlaps

    @property
    def complete(self) -> bool:
        """Whether every byte from the resume point to the end of the last disk is covered."""
        return self.frontier >= self.total

    @property
    def cursor(self) -> tuple[int, int]:
        """The frontier as (disk index, offset): where the IR would resume."""
        return self.point(self.frontier)

"""Recovery points: which ones a replica keeps, and how an old one is read back.

Every applied delta batch, and the completed IR, is a recovery point. The images always
hold the newest point. For every kept point *after the oldest*, the undo file
``undo/<seq>.undo`` holds what batch ``seq`` overwrote, captured from the images before
the batch touched them. Reading point ``p`` therefore takes the current bytes and lays
over them, newest batch first, the undo data of every kept batch newer than ``p``.

All undo records of one batch were read from the same (pre-batch) image, so records of one
file that overlap carry the same bytes and their order does not matter.

Pruning keeps the newest ``keep_points`` points; the undo file of the oldest kept point is
no longer needed (nothing older is readable), so it goes with the dropped points.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .journal import KIND_DATA, Record


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    """A point the replica can be read (and failed over) at."""

    sequence: int
    captured_at_ms: int  # when the primary captured the batch (ms since the epoch)
    applied_at: float  # when this node made it durable (seconds since the epoch)
    #: The batch's aggregate digest (hex; "" when unknown, e.g. replayed from the journal
    #: after a crash): a resend of this sequence must carry the same one.
    digest: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sequence": self.sequence,
            "captured_at_ms": self.captured_at_ms,
            "applied_at": self.applied_at,
        }
        if self.digest:
            out["digest"] = self.digest
        return out

    @classmethod
    def from_json(cls, raw: Any) -> RecoveryPoint:
        if not isinstance(raw, dict):
            raise ValueError("recovery point is not an object")
        seq, cap, at = raw.get("sequence"), raw.get("captured_at_ms"), raw.get("applied_at")
        if not isinstance(seq, int) or not isinstance(cap, int):
            raise ValueError("recovery point fields have the wrong types")
        if not isinstance(at, int | float):
            raise ValueError("recovery point applied_at is not a number")
        digest = raw.get("digest", "")
        if not isinstance(digest, str):
            raise ValueError("recovery point digest is not text")
        return cls(seq, cap, float(at), digest)


def prune(points: Sequence[RecoveryPoint], keep: int) -> list[RecoveryPoint]:
    """The newest ``keep`` points of ``points`` (oldest first)."""
    return list(points[-keep:]) if len(points) > keep else list(points)


def needed_undo(points: Sequence[RecoveryPoint]) -> set[int]:
    """Sequences whose undo files must be kept to read every point of ``points``."""
    return {p.sequence for p in points[1:]}


def overlay(
    buf: bytearray,
    disk_index: int,
    offset: int,
    records: Iterable[Record],
    undo_fd: int,
) -> None:
    """Lay the parts of one undo file's ``records`` that fall in
    ``[offset, offset + len(buf))`` of disk ``disk_index`` over ``buf``."""
    end = offset + len(buf)
    view = memoryview(buf)
    for rec in records:
        if rec.disk_index != disk_index:
            continue
        lo = max(offset, rec.offset)
        hi = min(end, rec.offset + rec.length)
        if lo >= hi:
            continue
        if rec.kind == KIND_DATA:
            target = view[lo - offset : hi - offset]
            got = os.preadv(undo_fd, [target], rec.data_pos + (lo - rec.offset))
            if got != hi - lo:
                raise OSError(5, "short read of undo data")
        else:
            view[lo - offset : hi - offset] = bytes(hi - lo)

"""What a failover keeps until it is completed or cancelled: ``<vmid>/failover/``.

A failover (``Replica.fail_over``) brings the images back to the chosen point ``P`` and
moves the relationship to a new generation. Until the operator *completes* it
(Hyper-V's ``Complete-VMFailover``: keep ``P``, remove the other points) or *cancels* it
(``Stop-VMFailover``: the replica goes back to where replication left it, ``S``, at the
former generation, so the primary carries on), the failover keeps here::

    failover/
      record.json        the failover: S, P, the generations, the points before it,
                         and the phase (failed-over, completing, cancelling)
      redo.undo          what the images held at S under every range the revert
                         overwrote (undo-file format): written before the first
                         revert write, so a cancel can put S back
      undo/<seq>.undo    the undo files of the points newer than P, set aside (the
                         replica's recovery would remove them from undo/, as no kept
                         point needs them now); moved back by a cancel
      fingerprint.bin    XXH3-128 of every 1 MiB block of the disks at P, before the
                         VM started: a cancel refuses when the VM wrote since (it ran
                         from these images, and what it overwrote is not kept)
      reversed           where reverse replication from this replica goes, once it
                         was set up: a cancel refuses from then on (the other side
                         holds the VM at the failover's generation)

``record.json`` is written (atomically) only once ``redo.undo`` is whole: its presence for
the failover's generation says the images may be touched. Every step after is
idempotent, and the phase is written before the step it names, so running the command
again (or the store's recovery) finishes the same step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import frproto

from . import layout as lay
from .fileio import FileIO, mapped
from .points import RecoveryPoint

FAILOVER_DIR: Final = "failover"
RECORD_FILE: Final = "record.json"
REDO_FILE: Final = "redo.undo"
FINGERPRINT_FILE: Final = "fingerprint.bin"
REVERSED_FILE: Final = "reversed"
#: The block of the disks' fingerprint.
FINGERPRINT_BLOCK: Final = 1 << 20

#: The failover is in force; it can be completed or cancelled.
FAILED_OVER: Final = "failed-over"
#: Completing: the other points are being removed (a cancel is refused from here on).
COMPLETING: Final = "completing"
#: Cancelling: the replica is going back to ``from_sequence`` (a complete is refused).
CANCELLING: Final = "cancelling"
_PHASES: Final = (FAILED_OVER, COMPLETING, CANCELLING)


@dataclass(frozen=True, slots=True)
class FailoverRecord:
    """``record.json``: a failover not completed nor cancelled yet."""

    generation: int  #: the failover's generation
    from_generation: int  #: the relationship's generation before it
    from_sequence: int  #: S: where replication left the replica
    point: int  #: P: the point failed over to
    points: tuple[RecoveryPoint, ...]  #: the kept points before the failover
    phase: str = FAILED_OVER
    #: A planned takeover (FailoverRequest, ``node/takeover.py``), not an unplanned
    #: failover: only then may its former primary repeat the request (FOV-11)
    planned: bool = False

    @property
    def newer(self) -> list[int]:
        """The sequences of the points newer than ``point`` (set aside), oldest first."""
        return [p.sequence for p in self.points if p.sequence > self.point]

    def to_bytes(self) -> bytes:
        doc = {
            "format": 1,
            "generation": self.generation,
            "from_generation": self.from_generation,
            "from_sequence": self.from_sequence,
            "point": self.point,
            "points": [p.to_json() for p in self.points],
            "phase": self.phase,
        }
        if self.planned:  # absent in the records of unplanned failovers (and older ones)
            doc["planned"] = True
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> FailoverRecord:
        doc: Any = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != 1:
            raise ValueError("unknown failover record format")
        ints = [doc.get(k) for k in ("generation", "from_generation", "from_sequence", "point")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError("failover record fields have the wrong types")
        phase = doc.get("phase")
        if phase not in _PHASES:
            raise ValueError(f"failover record phase {phase!r}")
        points = doc.get("points")
        if not isinstance(points, list):
            raise ValueError("failover record points is not a list")
        planned = doc.get("planned", False)
        if not isinstance(planned, bool):
            raise ValueError("failover record planned is not a boolean")
        return cls(
            int(doc["generation"]),
            int(doc["from_generation"]),
            int(doc["from_sequence"]),
            int(doc["point"]),
            tuple(RecoveryPoint.from_json(p) for p in points),
            str(phase),
            planned,
        )


class FailoverFiles:
    """One replica's ``failover/`` directory. Not thread-safe: the replica's lock is
    held around every call."""

    __slots__ = ("_io", "_lay")

    def __init__(self, io: FileIO, lo: lay.ReplicaLayout) -> None:
        self._io = io
        self._lay = lo

    @property
    def dir(self) -> Path:
        return self._lay.dir / FAILOVER_DIR

    @property
    def redo(self) -> Path:
        return self._lay.checked(self.dir / REDO_FILE)

    @property
    def fingerprint_path(self) -> Path:
        return self._lay.checked(self.dir / FINGERPRINT_FILE)

    def set_aside(self, seq: int) -> Path:
        """Where the undo file of point ``seq`` is kept while the failover lasts."""
        return self._lay.checked(self.dir / lay.UNDO_DIR / lay.seq_name(seq, lay.UNDO_SUFFIX))

    def exists(self) -> bool:
        return os.path.lexists(self.dir)

    def read(self) -> FailoverRecord | None:
        """The record, or None when there is none (no failover kept, or one whose redo
        data was not whole yet)."""
        path = self._lay.checked(self.dir / RECORD_FILE)
        if not os.path.lexists(path):
            return None
        with mapped("read failover record", path):
            raw = path.read_bytes()
        return FailoverRecord.from_bytes(raw)

    def prepare(self) -> None:
        """Make an empty ``failover/`` (and ``failover/undo/``), durably; whatever an
        earlier, unfinished attempt left there goes first."""
        with mapped("prepare failover", self.dir):
            if self.exists():
                self._io.remove_tree(self.dir)
            self._io.mkdir(self.dir)
            self._io.mkdir(self.dir / lay.UNDO_DIR)
            self._io.fsync_dir(self.dir)
            self._io.fsync_dir(self._lay.dir)

    def write(self, record: FailoverRecord) -> None:
        """Replace ``record.json`` durably."""
        path = self._lay.checked(self.dir / RECORD_FILE)
        with mapped("write failover record", path):
            self._io.write_file_durably(path, record.to_bytes())

    def set_phase(self, record: FailoverRecord, phase: str) -> FailoverRecord:
        """``record`` in ``phase``, written durably."""
        new = replace(record, phase=phase)
        if record.phase == phase:
            return record
        if record.phase != FAILED_OVER:
            raise frproto.OutOfSequence(
                f"the failover is being {record.phase.removesuffix('ing')}ed: "
                f"finish that first ({self.dir})"
            )
        self.write(new)
        return new

    def move(self, src: Path, dst: Path) -> None:
        """Rename ``src`` to ``dst`` if ``src`` is still there (idempotent), durably."""
        if os.path.lexists(src):
            with mapped("move undo", src):
                self._io.rename(src, dst)
                self._io.fsync_dir(dst.parent)
                self._io.fsync_dir(src.parent)

    def write_fingerprint(self, data: bytes) -> None:
        with mapped("write fingerprint", self.fingerprint_path):
            self._io.write_file_durably(self.fingerprint_path, data)

    def fingerprint(self) -> bytes | None:
        path = self.fingerprint_path
        if not os.path.lexists(path):
            return None
        with mapped("read fingerprint", path):
            return path.read_bytes()

    def mark_reversed(self, destination: str) -> None:
        """Record, durably, that reverse replication to ``destination`` was set up."""
        path = self._lay.checked(self.dir / REVERSED_FILE)
        with mapped("mark failover reversed", path):
            self._io.write_file_durably(path, destination.encode())

    def reversed_to(self) -> str | None:
        """Where reverse replication from this replica goes, or None if it was not set up."""
        path = self._lay.checked(self.dir / REVERSED_FILE)
        if not os.path.lexists(path):
            return None
        with mapped("read failover reversed", path):
            return path.read_bytes().decode(errors="replace")

    def remove(self) -> None:
        """Remove ``failover/``: the record first (atomically), so that what a crash
        leaves is a directory without a record, which only this removal reads."""
        if not self.exists():
            return
        record = self._lay.checked(self.dir / RECORD_FILE)
        with mapped("remove failover record", record):
            self._io.unlink(record)
            self._io.fsync_dir(self.dir)
        with mapped("remove failover", self.dir):
            self._io.remove_tree(self.dir)
            self._io.fsync_dir(self._lay.dir)

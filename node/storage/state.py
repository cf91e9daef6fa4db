"""Where a replica's durable state lives: ``state.json``, and the one copy of it in memory.

The state says who the replica is (VMID, name, disks, primary, trust group, generation),
how far its initial replication got, which batch is applied and which recovery points are
kept. Every step that changes it (an IR checkpoint, a batch's step 5, a failover's
decision) writes the whole file anew through :meth:`StateFile.save` (temp file, fsync,
rename, fsync of the directory), so a crash leaves one whole version, never a mix.

The pieces of a replica (the IR, the batch commit, recovery at start-up) share one
:class:`StateFile` and read :attr:`StateFile.current`; none keeps a copy of its own, so
none can act on a state another piece has already replaced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from uuid import UUID

import xxhash

from frproto import DiskInfo, IRState

from . import layout as lay
from .fileio import FileIO, mapped
from .points import RecoveryPoint, needed_undo, prune

STATE_FORMAT: Final = 2
#: Written before the checksum came in; still read (a flipped bit cannot turn a 2 into a
#: 1: they differ in two bits).
LEGACY_STATE_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What ``state.json`` holds (see ``docs/storage.md``)."""

    vmid: UUID
    name: str
    disks: tuple[DiskInfo, ...]
    primary: str
    trust_group: str
    generation: int = 1
    ir_state: IRState = IRState.NOT_STARTED
    ir_sequence: int = 0
    ir_cursor: tuple[int, int] = (0, 0)
    ir_resumed: bool = False
    applied_sequence: int = 0
    points: tuple[RecoveryPoint, ...] = field(default_factory=tuple)
    #: The VM was failed over to this site: no primary may replicate to it any more.
    failed_over: bool = False
    #: A failover in progress reverts the images to this point (-1: none).
    reverting_to: int = -1

    def after_batch(
        self, sequence: int, captured_at_ms: int, keep_points: int, digest: str = ""
    ) -> tuple[ReplicaState, set[int]]:
        """The state once batch ``sequence`` is applied (its point added, the points
        pruned to ``keep_points``), and the undo files that makes obsolete."""
        before = needed_undo(self.points) | {sequence}
        point = RecoveryPoint(sequence, captured_at_ms, time.time(), digest)
        points = prune([*self.points, point], keep_points)
        obsolete = before - needed_undo(points)
        return replace(self, applied_sequence=sequence, points=tuple(points)), obsolete

    def to_bytes(self) -> bytes:
        doc = {
            "format": STATE_FORMAT,
            "vmid": str(self.vmid),
            "name": self.name,
            "disks": [{"disk_id": d.disk_id, "size": d.size} for d in self.disks],
            "primary": self.primary,
            "trust_group": self.trust_group,
            "generation": self.generation,
            "ir_state": int(self.ir_state),
            "ir_sequence": self.ir_sequence,
            "ir_cursor": list(self.ir_cursor),
            "ir_resumed": self.ir_resumed,
            "applied_sequence": self.applied_sequence,
            "points": [p.to_json() for p in self.points],
        }
        if self.failed_over:
            doc["failed_over"] = True
        if self.reverting_to >= 0:
            doc["reverting_to"] = self.reverting_to
        doc["checksum"] = _checksum(doc)
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> ReplicaState:
        doc = state_document(raw)

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = doc.get(key)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise ValueError(f"state field {key!r} is missing or has the wrong type")
            return value

        disks = []
        for d in get("disks", list):
            if not isinstance(d, dict):
                raise ValueError("disk entry is not an object")
            disk_id, size = d.get("disk_id"), d.get("size")
            if not isinstance(disk_id, str) or not isinstance(size, int) or size < 0:
                raise ValueError("disk entry has the wrong types")
            lay.check_disk_id(disk_id)
            disks.append(DiskInfo(disk_id=disk_id, size=size))
        cursor = get("ir_cursor", list)
        if len(cursor) != 2 or not all(isinstance(c, int) for c in cursor):
            raise ValueError("ir_cursor is not two integers")
        return cls(
            vmid=UUID(get("vmid", str)),
            name=get("name", str),
            disks=tuple(disks),
            primary=get("primary", str),
            trust_group=get("trust_group", str),
            generation=get("generation", int),
            ir_state=IRState(get("ir_state", int)),
            ir_sequence=get("ir_sequence", int),
            ir_cursor=(cursor[0], cursor[1]),
            ir_resumed=get("ir_resumed", bool),
            applied_sequence=get("applied_sequence", int),
            points=tuple(RecoveryPoint.from_json(p) for p in get("points", list)),
            failed_over=bool(doc.get("failed_over", False)),
            reverting_to=int(doc.get("reverting_to", -1)),
        )


def _checksum(doc: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "checksum"}, indent=1, sort_keys=True)
    return xxhash.xxh3_64_hexdigest(body.encode())


def state_document(raw: bytes) -> dict[str, Any]:
    """The JSON object of a ``state.json``, its checksum checked: a flipped bit in an
    applied sequence or a recovery point would otherwise read as another valid state.

    Raises:
        ValueError: not a state file of a known format, or the checksum fails.
    """
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("unknown state format")
    if doc.get("format") == STATE_FORMAT:
        if doc.get("checksum") != _checksum(doc):
            raise ValueError("the state's checksum does not match (a damaged file)")
        # The checksum covers what the document says; a flip that leaves the meaning as
        # it was (the 17th digit of a float that parses to the same number) still
        # changes the bytes, which must be exactly what was written.
        if json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n" != raw:
            raise ValueError("the state file is not as it was written (a damaged file)")
    elif doc.get("format") != LEGACY_STATE_FORMAT:
        raise ValueError("unknown state format")
    return doc


class StateFile:
    """A replica's ``state.json``: the state in force, and the durable write of a new one."""

    __slots__ = ("_current", "_io", "_path")

    def __init__(self, io: FileIO, path: Path, state: ReplicaState) -> None:
        self._io = io
        self._path = path
        self._current = state

    @property
    def current(self) -> ReplicaState:
        """The state last read or durably written."""
        return self._current

    def save(self, state: ReplicaState) -> None:
        """Replace the file with ``state`` (durable on return), then make it current."""
        with mapped("write state", self._path):
            self._io.write_file_durably(self._path, state.to_bytes())
        self._current = state

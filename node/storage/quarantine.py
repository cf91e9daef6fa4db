"""Where a damaged replica is set aside by an operator (``frctl replica quarantine``).

A replica whose ``state.json`` is damaged (its checksum fails, docs/storage.md "Damaged
files") cannot be opened: the server refuses its VM (INTERNAL) and the primary cannot go
on. The operator moves it, whole, to ``<storage>/.quarantine/<vmid>.<UTC time>`` (kept
for inspection, never read by the server); the VM is then unknown here, and the
primary's next cycle creates a new replica and starts an initial replication. Only a
damaged replica is moved: one that opens is refused, so the command cannot drop a
healthy replica by a slip.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import frproto

from . import layout as lay
from .fileio import FileIO, mapped
from .store import ReplicaStore


def is_damaged(storage: Path, vmid: uuid.UUID) -> str | None:
    """Why the replica of ``vmid`` under ``storage`` cannot be opened, or None if it
    opens (``frproto.UnknownVM`` if there is none)."""
    with ReplicaStore(storage) as store:
        if not store.exists(vmid):
            raise frproto.UnknownVM(f"no replica of {vmid} in {storage}")
        try:
            store.open(vmid)
        except frproto.InternalError as exc:
            return str(exc)
    return None


def quarantine(storage: Path, vmid: uuid.UUID, *, io: FileIO | None = None) -> Path:
    """Move the damaged replica of ``vmid`` aside, durably; returns where it went.
    ``io`` replaces the system calls (the I/O-error tests).

    Raises:
        frproto.UnknownVM: no replica of ``vmid`` there. frproto.AlreadyExists: the
            replica is not damaged (it opens): nothing is moved.
    """
    if is_damaged(storage, vmid) is None:
        raise frproto.AlreadyExists(
            f"the replica of {vmid} in {storage} opens: it is not damaged, nothing moved"
        )
    root = Path(storage).resolve(strict=True)
    source = lay.check_inside(root, root / str(vmid))
    aside = lay.check_inside(root, root / lay.QUARANTINE_DIR)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = aside / f"{vmid}.{stamp}"
    io = io if io is not None else FileIO(None)
    with mapped("quarantine replica", source):
        io.mkdir(aside, exist_ok=True)
        io.fsync_dir(root)
        io.rename(source, target)
        io.fsync_dir(aside)
        io.fsync_dir(root)
    return target


__all__ = ["is_damaged", "quarantine"]

"""Replicas of one VMID found in more than one storage location of a recovery server.

A VMID names one VM on a whole server (docs/protocol.md REP-33), so the server never makes
a second replica of it; a second copy can still appear by hand (a storage location copied
or restored from a backup, an authorization entry pointed elsewhere). The server refuses
such a VMID until an operator keeps one copy (REP-34): :func:`find_duplicates` shows every
copy, :func:`remove_duplicate` removes one and never the last. ``frctl replica
duplicates`` and ``frctl replica remove-duplicate`` are their command line.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import frproto as fp

from .store import ReplicaStore


@dataclass(frozen=True)
class Copy:
    """One copy of a duplicated replica: where it is and what it says of itself."""

    vmid: uuid.UUID
    storage: Path
    name: str
    trust_group: str
    primary: str
    applied_sequence: int  #: its last recovery point applied
    ir_state: str

    def to_dict(self) -> dict[str, object]:
        return {
            "vmid": str(self.vmid),
            "storage": str(self.storage),
            "name": self.name,
            "trust_group": self.trust_group,
            "primary": self.primary,
            "applied_sequence": self.applied_sequence,
            "ir": self.ir_state,
        }


def _copy(store: ReplicaStore, storage: Path, vmid: uuid.UUID) -> Copy:
    replica = store.open(vmid)
    return Copy(
        vmid,
        storage,
        replica.name,
        replica.trust_group,
        replica.primary,
        replica.applied_sequence,
        replica.ir_state.name,
    )


def find_duplicates(places: Iterable[Path]) -> dict[uuid.UUID, list[Copy]]:
    """Every VMID held in more than one of ``places`` (the server's storage locations),
    with each copy; a place that does not exist holds nothing."""
    copies: dict[uuid.UUID, list[Copy]] = {}
    for place in sorted(set(places)):
        if not place.is_dir():
            continue
        with ReplicaStore(place) as store:
            for vmid in store.vmids():
                copies.setdefault(vmid, []).append(_copy(store, place, vmid))
    return {vmid: found for vmid, found in copies.items() if len(found) > 1}


def remove_duplicate(places: Iterable[Path], vmid: uuid.UUID, storage: Path) -> Copy:
    """Remove the copy of ``vmid`` in ``storage`` (one of ``places``), without a tombstone:
    the VM lives on in its other copy. Returns what was removed.

    Raises:
        frproto.UnknownVM: ``storage`` is not one of ``places`` or holds no copy.
        frproto.AlreadyExists: it is the only copy (removing it would lose the VM's replica;
            a replica is deleted by its primary, or ``frctl cluster delete``).
    """
    known = {os.path.realpath(p): p for p in places}
    place = known.get(os.path.realpath(storage))
    if place is None:
        where = ", ".join(sorted(map(str, known.values()))) or "none"
        raise fp.UnknownVM(f"{storage} is not a storage location of this server ({where})")
    copies = find_duplicates(known.values()).get(vmid, [])
    if not any(c.storage == place for c in copies):
        with ReplicaStore(place) as store:
            held = store.exists(vmid)
        if not held:
            raise fp.UnknownVM(f"no replica of {vmid} in {place}")
        raise fp.AlreadyExists(
            f"the replica of {vmid} in {place} is its only copy on this server: not removed"
        )
    with ReplicaStore(place) as store:
        removed = _copy(store, place, vmid)
        store.delete(vmid, tombstone=False)
    return removed


__all__ = ["Copy", "find_duplicates", "remove_duplicate"]

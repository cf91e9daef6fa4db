"""Unplanned failover: the primary site is lost; the VM is brought up from its replica.

Run at the recovery server, with that server stopped (the replica changes under it: the
storage lock, ``node/storage/lock.py``, must be free); a running server does it itself
when asked on its control socket (``control.py``). The replica is brought to the
chosen kept recovery point (default: the latest), the newer points are dropped, and the
relationship moves to a new generation marked failed over: from then on the recovery
server refuses the former primary (no split brain), whatever generation it presents.
Then the start hook tells the embedding tool to start the VM from the replica's disks,
in place.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from node.storage import Replica, ReplicaStore
from node.storage.lock import claim
from node.storage.point_copy import PointCopy

from .test import CommandHook, find_replica


@dataclass(frozen=True)
class FailoverResult:
    """What an unplanned failover did."""

    vmid: uuid.UUID
    sequence: int  #: the recovery point the VM runs from
    generation: int  #: the relationship's new generation
    disks: tuple[Path, ...]
    seconds: float

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "vmid": str(self.vmid),
            "sequence": self.sequence,
            "generation": self.generation,
            "disks": [str(p) for p in self.disks],
            "seconds": round(self.seconds, 3),
        }


def unplanned_failover(
    storages: list[Path],
    vmid: uuid.UUID,
    *,
    sequence: int | None = None,
    start: CommandHook | None = None,
) -> FailoverResult:
    """Fail the VM over to its replica at ``sequence`` (see the module docstring).

    Raises:
        node.storage.lock.StorageBusy: a recovery server still serves the storage.
        frproto.UnknownVM / OutOfSequence: no such replica, or the point is not kept.
        HookFailed: the start hook failed (the failover itself is done).
    """
    started = time.monotonic()
    storage = find_replica(storages, vmid)
    lock = claim(storage)
    try:
        with ReplicaStore(storage) as store:
            replica = store.open(vmid)
            generation = replica.fail_over(sequence)
            running = in_place(replica)
    finally:
        os.close(lock)
    if start is not None:
        start(running)
    return FailoverResult(
        vmid, running.sequence, generation, running.disks, time.monotonic() - started
    )


def in_place(replica: Replica) -> PointCopy:
    """The failed-over replica as the start hook sees it: the VM runs from the replica's
    own directory, config and disks (no copy)."""
    disks = tuple(replica.image_path(i) for i in range(len(replica.disks)))
    return PointCopy(
        replica.vmid,
        replica.applied_sequence,
        replica.layout.dir,
        replica.layout.config,
        disks,
        0,
        0.0,
    )

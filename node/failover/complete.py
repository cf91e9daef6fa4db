"""Completing or cancelling a failover at a stand-alone recovery server.

After a failover (unplanned, or the takeover of a planned one) the VM runs from its
replica at the chosen point, and the points newer than it are kept aside
(``node/storage/failover_record.py``). The operator then either:

* **completes** it (Hyper-V's ``Complete-VMFailover``): the chosen point is kept, every
  other point and what was kept aside is removed; the failover can no longer be undone;
* **cancels** it (``Stop-VMFailover``): the stop hook stops the VM, and the replica goes
  back to where replication left it (the newest point, every point, the generation from
  before the failover), so the primary's next cycle carries on where it was. The VM ran
  from the replica's own images, and what it wrote over is not kept: when the disks
  differ from what the failover left, the cancel is refused (unless ``discard_writes``;
  then verify or resynchronize the VM after).

Both run with the recovery server stopped, as the failover itself (the storage lock,
``node/storage/lock.py``), and both are crash-safe: the step is written before it is
taken, and running the command again (or starting the server) finishes it.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node.storage import Replica, ReplicaStore
from node.storage.lock import claim

from .test import CommandHook, find_replica
from .unplanned import in_place


@dataclass(frozen=True)
class Ending:
    """What a complete or a cancel did."""

    action: str  #: "complete" or "cancel"
    vmid: uuid.UUID
    sequence: int  #: the point the replica is at now
    generation: int
    points: tuple[int, ...]  #: the kept points now
    seconds: float

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "action": self.action,
            "vmid": str(self.vmid),
            "sequence": self.sequence,
            "generation": self.generation,
            "points": list(self.points),
            "seconds": round(self.seconds, 3),
        }


def _ended(
    action: str, storages: list[Path], vmid: uuid.UUID, end: Callable[[Replica], int]
) -> Ending:
    """Run ``end`` on the replica of ``vmid``, its storage claimed (a recovery server
    serving it must be stopped first)."""
    started = time.monotonic()
    storage = find_replica(storages, vmid)
    lock = claim(storage)
    try:
        with ReplicaStore(storage) as store:
            replica = store.open(vmid)
            sequence = end(replica)
            points = tuple(p.sequence for p in replica.recovery_points())
            generation = replica.generation
    finally:
        os.close(lock)
    return Ending(action, vmid, sequence, generation, points, time.monotonic() - started)


def complete_failover(storages: list[Path], vmid: uuid.UUID) -> Ending:
    """Complete the failover of ``vmid`` (see the module docstring).

    Raises:
        node.storage.lock.StorageBusy: a recovery server still serves the storage.
        frproto.UnknownVM / OutOfSequence: no such replica, or it is not failed over.
    """
    return _ended("complete", storages, vmid, lambda replica: replica.complete_failover())


def cancel_failover(
    storages: list[Path],
    vmid: uuid.UUID,
    *,
    stop: CommandHook | None = None,
    discard_writes: bool = False,
) -> Ending:
    """Cancel the failover of ``vmid``: the stop hook first (the VM must not run from
    the replica while it goes back), then the replica back to where replication left it.

    Raises:
        node.storage.lock.StorageBusy: a recovery server still serves the storage.
        frproto.UnknownVM / OutOfSequence: no such replica, not failed over, completed,
            or the VM wrote to its disks (see the module docstring).
        HookFailed: the stop hook failed (nothing was changed).
    """

    def end(replica: Replica) -> int:
        if stop is not None and replica.failed_over:
            stop(in_place(replica))
        return replica.cancel_failover(discard_writes=discard_writes)

    return _ended("cancel", storages, vmid, end)

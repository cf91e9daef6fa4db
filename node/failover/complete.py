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

With the recovery server stopped, the command claims the storage (``node/storage/lock.py``)
and does the step itself; with it running, the command asks it on its control socket
(``node/failover/control.py``, :func:`end_at_running_server`): the server holds the VM,
settles its last batch and runs the same step (:func:`end_held`). The stop hook of a
cancel runs in the command either way, before the replica changes. Both are
crash-safe: the step is written before it is taken, and running the command again (or
starting the server) finishes it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.storage import Replica, ReplicaStore
from node.storage.layout import ReplicaLayout
from node.storage.lock import claim
from node.storage.state import ReplicaState

from .test import CommandHook, find_replica
from .unplanned import in_place

if TYPE_CHECKING:
    from .control import ControlHost


log = logging.getLogger("frrep.failover")


class ServerRefused(Exception):
    """The running recovery server refused the step (its reason is the message)."""


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
    return _ended("complete", storages, vmid, lambda replica: end_replica(replica, "complete"))


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
        return end_replica(replica, "cancel", discard_writes=discard_writes)

    return _ended("cancel", storages, vmid, end)


def end_replica(replica: Replica, action: str, *, discard_writes: bool = False) -> int:
    """Complete or cancel the failover of an open ``replica`` (the step both the offline
    command and the running server take); the point the replica is at now."""
    if action == "complete":
        return replica.complete_failover()
    if action == "cancel":
        return replica.cancel_failover(discard_writes=discard_writes)
    raise ValueError(f"unknown ending {action!r}")


async def end_held(
    server: ControlHost, vmid: uuid.UUID, action: str, *, discard_writes: bool = False
) -> dict[str, Any]:
    """At the running server, asked on its control socket: complete or cancel the
    failover of ``vmid`` with the VM held and settled; the answer to send."""
    from .control import run_held

    def work(replica: Replica) -> dict[str, Any]:
        sequence = end_replica(replica, action, discard_writes=discard_writes)
        points = [p.sequence for p in replica.recovery_points()]
        log.info(
            "failover of %s ended (%s) on the control socket: at sequence %d (generation %d)",
            vmid,
            action,
            sequence,
            replica.generation,
        )
        return {
            "ok": True,
            "sequence": sequence,
            "generation": replica.generation,
            "points": points,
        }

    return await run_held(server, vmid, work)


def replica_state(storage: Path, vmid: uuid.UUID) -> ReplicaState:
    """The replica's state as its file says (the running server holds the replica: it
    is not opened here)."""
    return ReplicaState.from_bytes(ReplicaLayout(storage, vmid).state.read_bytes())


def end_at_running_server(
    storages: list[Path],
    vmid: uuid.UUID,
    action: str,
    *,
    stop: CommandHook | None = None,
    discard_writes: bool = False,
    wait_s: float = 30.0,
) -> Ending:
    """Complete or cancel the failover of ``vmid`` by the recovery server that runs on
    ``storages``, asked on its control socket. A cancel's stop hook runs here first,
    while the replica is still failed over (as offline: the VM must not run from it
    while it goes back).

    Raises:
        OSError: no server answers on the control socket.
        ServerRefused: the server refused (not failed over, completed, written to...).
        HookFailed: the stop hook failed (nothing was asked).
        frproto.UnknownVM: no replica of ``vmid`` in ``storages``.
    """
    from .control import ask, running_copy

    started = time.monotonic()
    storage = find_replica(storages, vmid)
    if action == "cancel" and stop is not None:
        state = replica_state(storage, vmid)
        if state.failed_over:
            stop(running_copy(storage, vmid, state.applied_sequence))
    request: dict[str, Any] = {"action": action, "vmid": str(vmid)}
    if action == "cancel":
        request["discard_writes"] = discard_writes
    reply = ask(storages, request, wait_s=wait_s)
    if not reply.get("ok"):
        raise ServerRefused(str(reply.get("error")))
    return Ending(
        action,
        vmid,
        int(reply["sequence"]),
        int(reply["generation"]),
        tuple(int(p) for p in reply["points"]),
        time.monotonic() - started,
    )

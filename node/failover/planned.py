"""Planned failover in one step, at the primary (protocol 1.1).

``frctl failover planned VMID`` runs this at the primary while both sites are up:

1. **Stop.** The stop hook stops the VM's writes (the embedding tool shuts it down).
2. **Last batch, hand-over.** The primary's last cycle sends what is still pending, the
   disks are read and their state digest computed, and the recovery side is asked to
   take the VM over at that final state (:meth:`VMReplicator.hand_over`, FailoverRequest).
   The recovery side checks that its replica holds exactly that state (sequence and
   state digest), fails over to it at the next generation and answers FailoverDone
   (``node/takeover.py``). A replica that differs is refused and nothing changes
   on either side but the stopped VM.
3. **Reverse.** With this host's recovery server configuration given, this host becomes
   the VM's recovery side: its disks, as they are now (the final state), are made the
   VM's replica in its recovery server's storage at the new generation
   (:func:`node.failover.reverse.adopt_disks`), *before* the request, so that the
   recovery side, which now runs the VM, finds it when its reverse replication starts
   by itself (``node/failover/reverse_service.py``), sending only what differs. If the
   failover is refused, that replica is removed again.

4. **In doubt.** When the request's answer is lost (the connection broke or timed out),
   the primary records it and raises :class:`node.primary.errors.FailoverInDoubt`; the
   replica made of this host's disks is kept (the other side may replicate back to it).
   The same command then re-runs only the hand-over (no stop hook, no last cycle):
   :meth:`VMReplicator.hand_over_again`, FOV-11; see ``docs/failover.md``.

Failing back is the same command at the other side (its reverse replication's primary
configuration), see ``docs/failover.md``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from frlink.authz import Authorization
from node.storage import ReplicaStore

from .reverse import Adopted, adopt_disks
from .test import HookFailed

log = logging.getLogger("frrep.failover")


@dataclass(frozen=True)
class PlannedFailover:
    """What a planned failover did."""

    vmid: uuid.UUID
    name: str
    sequence: int  #: the final state the recovery side runs the VM from
    generation: int  #: the relationship's new generation
    reverse: Adopted | None  #: this host's replica of the VM (reverse replication's target)
    seconds: float

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {
            "vmid": str(self.vmid),
            "name": self.name,
            "sequence": self.sequence,
            "generation": self.generation,
            "reverse": None
            if self.reverse is None
            else {"storage": str(self.reverse.storage), "generation": self.reverse.generation},
            "seconds": round(self.seconds, 3),
        }


async def run_stop_hook(command: str, vmid: uuid.UUID, disks: list[Path]) -> None:
    """Run the stop hook (a shell command, ``FRREP_VMID`` and ``FRREP_DISKS`` set).

    Raises:
        HookFailed: it exited with another status than 0.
    """
    env = {**os.environ, "FRREP_VMID": str(vmid), "FRREP_DISKS": ":".join(map(str, disks))}
    done = await trio.run_process(
        command, shell=True, env=env, check=False, capture_stdout=True, capture_stderr=True
    )
    if done.returncode:
        raise HookFailed(
            f"stop hook {command!r} exited {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )


async def planned_failover(
    replicator: Any,
    *,
    stop_command: str | None = None,
    authorization: Authorization | None = None,
    reverse_port: int = 0,
) -> PlannedFailover:
    """Fail the VM of ``replicator`` (a :class:`node.primary.replicator.VMReplicator`)
    over to its recovery side (see the module docstring).

    Args:
        stop_command: the stop hook; None when the VM's writes are stopped already.
        authorization: this host's recovery server's authorization: this host becomes
            the VM's recovery side, its replica where that gives the other side; None:
            it does not (no reverse replication).
        reverse_port: the port of this host's recovery server, which the recovery side
            replicates back to (0: none).

    Raises:
        HookFailed: the stop hook failed (nothing was asked).
        frproto.FrprotoError: the recovery side refused (nothing switched) or is 1.0 only.
    """
    from node.primary.errors import FailoverInDoubt

    started = time.monotonic()
    state = replicator.state
    vmid = uuid.UUID(state.vmid)
    disks = [(str(d["disk_id"]), Path(d["path"])) for d in state.disks]
    if state.failover_in_doubt is not None:
        return await _again(replicator, authorization, started)
    if stop_command:
        await run_stop_hook(stop_command, vmid, [p for _, p in disks])
    adopted: Adopted | None = None
    if authorization is not None:
        # The recovery side carries the relationship on at the next generation (FOV-6).
        adopted = await trio.to_thread.run_sync(
            lambda: adopt_disks(
                authorization,
                vmid,
                name=state.name,
                disks=disks,
                primary=state.server_name,
                generation=state.generation + 1,
            )
        )
    port = 0 if authorization is None else reverse_port
    try:
        done = await replicator.hand_over(reverse_port=port)
    except FailoverInDoubt:
        raise  # the other side may have taken the VM over: its reverse target stays
    except BaseException:
        if adopted is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_adopted, adopted)
        raise
    return await _finish(state, done, adopted, started)


async def _again(
    replicator: Any, authorization: Authorization | None, started: float
) -> PlannedFailover:
    """The request of an earlier run is in doubt: ask it again, exactly (FOV-11). The
    replica made of this host's disks then is kept; a refusal that ends the doubt with
    replication going on (the other side is not failed over) removes it."""
    from node.primary.errors import FailoverInDoubt

    state = replicator.state
    adopted = None
    if authorization is not None:
        adopted = await trio.to_thread.run_sync(_adopted_before, authorization, state)
    try:
        done = await replicator.hand_over_again()
    except FailoverInDoubt:
        raise
    except BaseException:
        if adopted is not None and replicator.state.halted is None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_adopted, adopted)
        raise
    log.info("%s: the planned failover asked again was answered", state.name)
    return await _finish(replicator.state, done, adopted, started)


def _adopted_before(authorization: Authorization, state: Any) -> Adopted | None:
    """The replica an earlier run made of this host's disks, if it is there."""
    vmid = uuid.UUID(state.vmid)
    grant = authorization.authorize([state.server_name])
    with ReplicaStore(grant.storage) as store:
        if not store.exists(vmid):
            return None
        generation = store.open(vmid).generation
    return Adopted(vmid, grant.storage, generation, 0)


async def _finish(
    state: Any, done: Any, adopted: Adopted | None, started: float
) -> PlannedFailover:
    """The request was answered FailoverDone: this host's replica takes its generation."""
    if adopted is not None and adopted.generation != done.generation:
        await trio.to_thread.run_sync(_set_generation, adopted, done.generation)
        adopted = Adopted(adopted.vmid, adopted.storage, done.generation, adopted.data_bytes)
    return PlannedFailover(
        uuid.UUID(state.vmid),
        state.name,
        done.sequence,
        done.generation,
        adopted,
        time.monotonic() - started,
    )


def _remove_adopted(adopted: Adopted) -> None:
    """The failover was refused: this host stays the primary, with no replica of its own
    VM."""
    with ReplicaStore(adopted.storage) as store:
        store.delete(adopted.vmid, tombstone=False)
    log.info("failover refused: the replica made of %s's disks is removed", adopted.vmid)


def _set_generation(adopted: Adopted, generation: int) -> None:
    with ReplicaStore(adopted.storage) as store:
        store.open(adopted.vmid).set_generation(generation)

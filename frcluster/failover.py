"""Where a node fails a VM over to the replica it owns, when an administrator asks.

In a cluster the replica's node runs the agent, which holds the replica storage; a
failover is therefore asked through the cluster store (``frctl cluster failover``
writes ``VMRecord.failover = FailoverState.REQUESTED``, with the point; ``broker/admin.py``)
and carried out by the owner:

1. it holds the VM on its recovery server (the primary's session, if any, ends first;
   a new one gets BUSY);
2. it brings the replica to the point and moves the relationship to a new generation,
   marked failed over (``Replica.fail_over``, crash-safe): from then on the node refuses
   the former primary whatever it presents, and the broker refuses it too;
3. it runs the node's ``failover_start`` hook (the VM starts from the replica's disks,
   in place; ``node/failover/test.py`` describes the hook's environment);
4. it records the outcome in the VM record: ``DONE`` with the point and generation,
   or ``FAILED`` with the reason (a point that is not kept, no complete replica).

A failed-over VM is never moved or re-homed: it runs where its replica is.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

import frproto as fp
from broker.records import FailoverState, Keys, RecordError, VMRecord
from broker.store import ClusterStore, Compare, Put, StoreError
from node.failover.test import CommandHook, HookFailed
from node.failover.unplanned import in_place
from node.storage.point_copy import PointCopy
from node.takeover import TakenOver

from .owned_record import RecordKeptChanging, update_owned_record
from .requests import RETRY_SECONDS, follow_requests, held, owned_requests

if TYPE_CHECKING:
    from .agent import ClusterNode

log = logging.getLogger("frrep.node")

#: How "failover requested" reads in a stored VM record (compact, sorted JSON).
_REQUESTED = f'"failover":"{FailoverState.REQUESTED}"'.encode()


class FailoverRunner:
    """Carries out the failovers asked of this node's replicas."""

    def __init__(self, node: ClusterNode, store: ClusterStore, keys: Keys) -> None:
        self.node = node
        self.store = store
        self.keys = keys

    async def run(self) -> None:
        """Carry out the failovers asked of this node, one at a time."""
        select = owned_requests(
            self.node.config.name,
            lambda raw: _REQUESTED in raw,
            lambda vm: vm.failover is FailoverState.REQUESTED and not vm.deleted,
        )
        await follow_requests(self.store, self.keys, select, self._try)

    async def _try(self, vm: VMRecord, revision: int) -> None:
        try:
            await self.fail_over(vm, revision)
        except (OSError, RecordError) as exc:
            log.warning("failover of %s failed: %s; trying again later", vm.vmid, exc)
            await trio.sleep(RETRY_SECONDS)

    async def fail_over(self, vm: VMRecord, revision: int) -> bool:
        """Fail ``vm`` over to its replica here; True when the outcome was recorded."""
        vmid = uuid.UUID(vm.vmid)
        async with held(self.node.server, vmid) as holding:
            if not holding:
                log.warning("failover of %s: its replication session did not end; later", vmid)
                return False
            self.node.forget(vmid)  # no stale handle: the replica changes under it
            storage = self.node.config.storage / vm.storage
            try:
                store = await self.node.server.store_for(storage)
                point = None if vm.failover_point < 0 else vm.failover_point

                def revert() -> tuple[int, PointCopy]:
                    replica = store.open(vmid)
                    if not replica.failed_over:  # else done before its outcome was recorded
                        replica.fail_over(point)
                    return replica.generation, in_place(replica)

                generation, running = await trio.to_thread.run_sync(revert)
            except fp.FrprotoError as exc:
                # A point not kept, no complete replica: only a person can choose again.
                log.error("failover of %s refused: %s", vmid, exc)
                return await self._record(
                    vm, revision, failover=FailoverState.FAILED, failover_note=str(exc)
                )
            note = ""
            command = self.node.config.failover_start
            if command:
                try:
                    await trio.to_thread.run_sync(CommandHook(command), running)
                    note = f"start hook ran: {command}"
                except HookFailed as exc:
                    note = f"the failover is done but the start hook failed: {exc}"
                    log.error("failover of %s: %s", vmid, note)
            log.info(
                "VM %s (%s) failed over at %s: recovery point %d, generation %d",
                vm.vmid,
                vm.name,
                self.node.config.name,
                running.sequence,
                generation,
            )
            return await self._record(
                vm,
                revision,
                failover=FailoverState.DONE,
                failover_point=running.sequence,
                failover_generation=generation,
                failover_note=note,
            )

    async def _record(self, vm: VMRecord, revision: int, **outcome: object) -> bool:
        key = self.keys.vm(vm.vmid)
        new = replace(vm, **outcome)  # type: ignore[arg-type]
        result = await self.store.txn(
            [Compare.mod_revision(key, "==", revision)], [Put(key, new.to_json())], []
        )
        if not result.succeeded:
            # Only the owner writes a requested failover's outcome, and the failover is
            # idempotent: the next scan records it (Replica.fail_over finishes the same).
            log.warning("failover of %s: its record changed meanwhile", vm.vmid)
        return result.succeeded


async def record_planned_failover(
    store: ClusterStore, keys: Keys, node_name: str, taken: TakenOver
) -> None:
    """A planned failover (protocol 1.1) took a VM over at this node: record it in the VM
    record as a failover done, with the point and the new generation, so that the broker
    and ``frctl cluster vms`` show it (and the broker refuses the former primary). A
    request that named a ``reverse_port`` is recorded as the VM's reverse direction, to
    the primary's address (``frcluster/reverse.py`` starts it, FOV-9). Best effort: the
    failover itself is durable in the replica; a failure is logged."""

    def done(vm: VMRecord) -> VMRecord:
        new = replace(
            vm,
            failover=FailoverState.DONE,
            failover_point=taken.sequence,
            failover_generation=taken.generation,
            failover_note=(
                f"planned failover asked at the cluster, handed over by its primary "
                f"{taken.primary_name}"
                if vm.failover is FailoverState.PLANNED_REQUESTED
                else f"planned failover asked by its primary {taken.primary_name}"
            ),
        )
        if taken.reverse_port and taken.primary_address:
            new = replace(
                new,
                reverse_to=f"{taken.primary_address}:{taken.reverse_port}",
                reverse_name=taken.primary_name,
            )
        return new

    try:
        if await update_owned_record(store, keys, taken.vmid, node_name, done) is not None:
            log.info(
                "VM %s: planned failover recorded (point %d, generation %d)",
                taken.vmid,
                taken.sequence,
                taken.generation,
            )
    except (StoreError, RecordError, RecordKeptChanging) as exc:
        log.warning("VM %s: the planned failover is not recorded: %s", taken.vmid, exc)

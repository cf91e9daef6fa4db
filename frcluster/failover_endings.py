"""Where a node completes or cancels a failover of a replica it owns, when asked.

As the failover itself (``frcluster/failover.py``), through the VM record:
``frctl cluster failover-complete`` / ``failover-cancel`` write ``VMRecord.failover =
COMPLETE_REQUESTED`` / ``CANCEL_REQUESTED`` (``broker/admin.py``), and the owner:

1. holds the VM on its recovery server (no session for it meanwhile);
2. completes the failover (``Replica.complete_failover``: the point it runs from is
   kept, the others removed) or cancels it: the node's ``failover_stop`` hook stops the
   VM, then ``Replica.cancel_failover`` brings the replica back to where replication
   left it, at the generation from before the failover (both crash-safe: a node that
   dies part way finishes at its next open of the replica, and the request, still in
   the record, is carried out again);
3. records the outcome: ``COMPLETED``; or ``NONE`` with the sequence and generation
   the replica is back at (the broker answers the primary again, which carries on); or,
   when the cancel is refused (the VM wrote to its disks), ``DONE`` again with the
   reason in the note.
"""

from __future__ import annotations

import logging
import uuid

import trio

import frproto as fp
from broker.records import FailoverState, RecordError, VMRecord
from node.failover.test import CommandHook, HookFailed
from node.failover.unplanned import in_place

from .failover import FailoverRunner
from .requests import RETRY_SECONDS, follow_requests, held, owned_requests

log = logging.getLogger("frrep.node")

_ASKED = (
    f'"failover":"{FailoverState.COMPLETE_REQUESTED}"'.encode(),
    f'"failover":"{FailoverState.CANCEL_REQUESTED}"'.encode(),
)


class FailoverEndingRunner(FailoverRunner):
    """Carries out the completes and cancels asked of this node's replicas (the
    outcome is recorded as the failover's is: :meth:`FailoverRunner._record`)."""

    async def run(self) -> None:
        """Carry them out, one at a time, until cancelled."""
        select = owned_requests(
            self.node.config.name,
            lambda raw: any(a in raw for a in _ASKED),
            lambda vm: vm.failover.ending and not vm.deleted,
        )
        await follow_requests(self.store, self.keys, select, self._try)

    async def _try(self, vm: VMRecord, revision: int) -> None:
        try:
            await self.end(vm, revision)
        except (OSError, RecordError, fp.ReplicationError) as exc:
            log.warning("failover ending of %s failed: %s; trying again later", vm.vmid, exc)
            await trio.sleep(RETRY_SECONDS)

    async def end(self, vm: VMRecord, revision: int) -> bool:
        """Complete or cancel ``vm``'s failover here; True when the outcome was recorded."""
        vmid = uuid.UUID(vm.vmid)
        cancel = vm.failover is FailoverState.CANCEL_REQUESTED
        async with held(self.node.server, vmid) as holding:
            if not holding:
                return False
            self.node.forget(vmid)
            store = await self.node.server.store_for(self.node.config.storage / vm.storage)
            stop = self.node.config.failover_stop

            def carry_out() -> tuple[int, int]:
                replica = store.open(vmid)
                if cancel:
                    if stop and replica.failed_over:
                        CommandHook(stop)(in_place(replica))
                    sequence = replica.cancel_failover()
                else:
                    sequence = replica.complete_failover()
                return sequence, replica.generation

            try:
                sequence, generation = await trio.to_thread.run_sync(carry_out)
            except (fp.OutOfSequence, HookFailed) as exc:
                # Refused (the VM wrote to its disks, the stop hook failed): the
                # failover stays in force; only a person can choose again.
                log.error(
                    "failover %s of %s refused: %s", "cancel" if cancel else "complete", vmid, exc
                )
                return await self._record(
                    vm, revision, failover=FailoverState.DONE, failover_note=str(exc)
                )
        if cancel:
            log.info(
                "VM %s: failover cancelled at %s; back at %d, generation %d",
                vmid,
                self.node.config.name,
                sequence,
                generation,
            )
            return await self._record(
                vm,
                revision,
                failover=FailoverState.NONE,
                failover_point=sequence,
                failover_generation=generation,
                failover_note=f"cancelled: back at {sequence}, generation {generation}",
            )
        log.info(
            "VM %s: failover completed at %s (point %d)", vmid, self.node.config.name, sequence
        )
        return await self._record(
            vm, revision, failover=FailoverState.COMPLETED, failover_point=sequence
        )

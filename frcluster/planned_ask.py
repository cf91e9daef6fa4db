"""Planned failovers asked at the cluster, from the VM's node (protocol 1.1, FailoverAsk).

``frctl cluster failover --planned VMID`` records ``VMRecord.failover =
planned-requested`` (``broker/admin.py``). The broker never connects to a primary, so
the ask travels on the primary's own next connection: the VM's owner reads the record
when the primary opens its relationship (the ownership check,
``ClusterNode._check_owner``), and its session sends a FailoverAsk just before
RelationshipAccepted (``node/recovery_session.py``). Then:

* the primary hands the VM over (FailoverRequest): the failover is recorded ``done`` with
  its generation by :func:`frcluster.failover.record_planned_failover`;
* it declines (FailoverDecline): :meth:`PlannedAsks.declined` records
  ``planned-declined`` with the primary's reason as ``failover_note`` (FOV-18); the VM
  replicates on and may move as before;
* a 1.0 primary is never asked: the ask stays pending until ``--wait`` withdraws it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from broker.records import FailoverState, Keys, RecordError, VMRecord
from broker.store import ClusterStore, StoreError

from .owned_record import RecordKeptChanging, update_owned_record

log = logging.getLogger("frrep.node")


class PlannedAsks:
    """The planned failovers pending for the VMs a node serves (a
    :class:`node.recovery_session.PlannedAsks`)."""

    def __init__(self, store: ClusterStore, keys: Keys, node_name: str) -> None:
        self.store = store
        self.keys = keys
        self.node_name = node_name
        #: VMs whose record said ``planned-requested`` when their primary last opened.
        self._pending: set[uuid.UUID] = set()

    def note(self, vmid: uuid.UUID, vm: VMRecord) -> None:
        """The record of ``vmid`` as the ownership check read it for its primary."""
        if vm.failover is FailoverState.PLANNED_REQUESTED and not vm.deleted:
            self._pending.add(vmid)
        else:
            self._pending.discard(vmid)

    def forget(self, vmid: uuid.UUID) -> None:
        """Ask nothing on the connection being opened for ``vmid`` (a peer node's)."""
        self._pending.discard(vmid)

    def asked(self, vmid: uuid.UUID) -> bool:
        """A planned failover of ``vmid`` is pending: its primary is asked."""
        return vmid in self._pending

    async def declined(self, vmid: uuid.UUID, primary: str, reason: str) -> None:
        """The primary declined: the record says ``planned-declined`` with its reason (if
        it still asks: an unplanned failover asked meanwhile, or a withdrawal, wins). Best
        effort: a failure is logged; the next open asks again."""
        self._pending.discard(vmid)
        note = f"declined by its primary {primary}: {reason}"

        def decline(vm: VMRecord) -> VMRecord | None:
            if vm.failover is not FailoverState.PLANNED_REQUESTED:
                return None
            return replace(vm, failover=FailoverState.PLANNED_DECLINED, failover_note=note)

        try:
            if await update_owned_record(self.store, self.keys, vmid, self.node_name, decline):
                log.info("VM %s: planned failover %s", vmid, note)
        except (StoreError, RecordError, RecordKeptChanging) as exc:
            log.warning("VM %s: the decline of its planned failover is not recorded: %s", vmid, exc)

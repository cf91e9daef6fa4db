"""Where a node moves its replicas to another node, when the broker asks.

The broker sets ``VMRecord.migrate_to`` (an administrator's move, or draining); the owner
node carries it out, because it is the one that can stop replication to the VM for the
moment of the switch: it *holds* the VM on its recovery server (a primary's session for
it gets BUSY meanwhile, and retries), then

* shared storage (both nodes see the same files): ownership changes in the store (a
  compare-and-swap on the VM record) and the node drops its open handle;
* local storage: the replica is copied to the target over the protocol's verified chunk
  stream (``transfer.py``), then ownership changes, then the local copy is removed.

The primary then gets VM_NOT_HERE from the old node, asks the broker, and carries on at the
new one: at most one cycle late, nothing lost (its pending log is only dropped on an ack).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

import frproto as fp
from broker.records import Keys, NodeRecord, RecordError, VMRecord
from broker.store import ClusterStore, Compare, Put
from frlink.tls import TLSFailure

from .requests import RETRY_SECONDS, follow_requests, held, owned_requests

if TYPE_CHECKING:
    from .agent import ClusterNode

log = logging.getLogger("frrep.node")

#: How "no move asked" reads in a stored VM record (records are compact, sorted JSON).
_NO_MOVE = b'"migrate_to":""'


class Migrator:
    """Carries out the moves of this node's replicas."""

    def __init__(self, node: ClusterNode, store: ClusterStore, keys: Keys) -> None:
        self.node = node
        self.store = store
        self.keys = keys

    async def run(self) -> None:
        """Make the moves asked of this node, one at a time (``requests.py``)."""
        select = owned_requests(
            self.node.config.name,
            lambda raw: _NO_MOVE not in raw,
            lambda vm: bool(vm.migrate_to) and not vm.deleted and not vm.failover.pins,
        )
        await follow_requests(self.store, self.keys, select, self._try_move)

    async def _try_move(self, vm: VMRecord, revision: int) -> None:
        """One move; a failure (target unreachable or refusing, no complete replica
        yet...) is logged and the move is tried again at a later pass."""
        try:
            await self.move(vm, revision)
        except (fp.FrprotoError, OSError, TLSFailure, RecordError) as exc:
            log.warning(
                "move of %s to %s failed: %s; trying again later", vm.vmid, vm.migrate_to, exc
            )
            await trio.sleep(RETRY_SECONDS)

    async def move(self, vm: VMRecord, revision: int) -> bool:
        """Move one replica to ``vm.migrate_to``; True when ownership switched."""
        vmid = uuid.UUID(vm.vmid)
        target_kv = await self.store.get(self.keys.node(vm.migrate_to))
        if target_kv is None:
            log.warning("move of %s: target %s is not up; waiting", vm.vmid, vm.migrate_to)
            return False
        target = NodeRecord.from_json(target_kv.value)
        async with held(self.node.server, vmid) as holding:
            if not holding:
                log.warning("move of %s: its replication session did not end; later", vm.vmid)
                return False
            return await self._switch(vm, revision, target)

    async def _switch(self, vm: VMRecord, revision: int, target: NodeRecord) -> bool:
        vmid = uuid.UUID(vm.vmid)
        shared = vm.shared and target.shared_storage and self.node.config.shared_storage
        if not shared:
            from .transfer import send_replica  # local storage: copy it first

            await send_replica(self.node, vm, target)
        moved = replace(vm, owner=target.name, migrate_to="", shared=shared)
        key = self.keys.vm(vm.vmid)
        result = await self.store.txn(
            [Compare.mod_revision(key, "==", revision)], [Put(key, moved.to_json())], []
        )
        if not result.succeeded:
            log.warning("move of %s: its record changed meanwhile; not switched", vm.vmid)
            return False
        self.node.forget(vmid)
        if not shared:
            await self.node.remove_local_replica(vm)
        how = "ownership change (shared storage)" if shared else "copied (local storage)"
        log.info("VM %s (%s) moved %s -> %s: %s", vm.vmid, vm.name, vm.owner, target.name, how)
        return True

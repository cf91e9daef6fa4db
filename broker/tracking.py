"""Where the broker keeps replicas where they can be reached: re-homing and draining.

* A node that stops renewing its lease disappears from the store: it is down. Its
  replicas on shared storage are re-homed at once (an ownership change: the new owner
  opens the same files). Replicas on a down node's local storage wait for it.
* A node an administrator drains (``NodeAdmin.draining``) takes nothing new; each of its
  replicas gets a target node (``VMRecord.migrate_to``), and the owner moves it
  (``frcluster/migration.py``): an ownership change on shared storage, a copy over the
  chunk stream otherwise.

Tracking reconciles on every change of the nodes and at least every
:data:`RECONCILE_SECONDS`, so a missed watch event only delays it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import trio

from broker.cluster_cache import ClusterCache
from broker.cluster_view import ClusterView
from broker.election import Term, fenced_txn
from broker.placement import PlacementError
from broker.records import Keys, PlacementCursor, VMRecord
from broker.store import ClusterStore, Compare, Put, StoreError

log = logging.getLogger("frrep.broker")

RECONCILE_SECONDS = 1.0

#: ``choose(view, vm, exclude=..., shared_only=...) -> node name`` (the broker's placement).
Chooser = Callable[..., str]


class Tracker:
    """Re-homes replicas of down nodes and plans the moves off draining nodes."""

    def __init__(
        self,
        store: ClusterStore,
        keys: Keys,
        term: Term,
        choose: Chooser,
        cache: ClusterCache,
    ) -> None:
        self.store = store
        self.keys = keys
        self.term = term
        self.choose = choose
        self.cache = cache

    async def run(self) -> None:
        """Reconcile on every change of the broker's copy of the cluster, and at least
        every RECONCILE_SECONDS. Reads no store: a pass over 8,000 VMs in memory takes a
        few milliseconds, where reading them would stall the broker's queries."""
        while True:
            try:
                seen = self.cache.membership_changes
                await self.reconcile(self.cache.view())
                await self.cache.wait_membership_change(seen, timeout=RECONCILE_SECONDS)
            except StoreError as exc:
                log.warning("tracking: %s", exc)
                await trio.sleep(RECONCILE_SECONDS)

    async def reconcile(self, view: ClusterView) -> None:
        """One pass: re-home what must be, plan the moves off draining nodes.

        ``view`` is this pass's own read: after each decision it is updated as if the
        replica were already on its new node, and the cursor advanced, so that the next
        decision spreads over the nodes instead of sending everything to one."""
        fine = {n for n, node in view.nodes.items() if not node.admin.draining}
        if all(_settled(vm, fine) or vm.migrate_to for vm in view.vms.values()):
            return  # the usual case, in about a millisecond for 8,000 VMs
        view = replace(view, vms=dict(view.vms))  # ours to change (it may be the cache's)
        for vm in list(view.vms.values()):
            if _settled(vm, fine):
                continue
            target: str | None = None
            if vm.owner not in view.nodes:
                if vm.shared:
                    target = await self.rehome(view, vm)
            elif view.nodes[vm.owner].admin.draining and not vm.migrate_to:
                target = await self._plan_move(view, vm)
            if target is not None:
                view.vms[vm.vmid] = replace(vm, owner=target)
                cursor = PlacementCursor(last_node=target, placed=view.cursor.placed + 1)
                view = replace(view, cursor=cursor)

    async def rehome(self, view: ClusterView, vm: VMRecord) -> str | None:
        """Give a down node's shared-storage replica to another node (None: not shared,
        or no node can take it, or the record changed meanwhile)."""
        if not vm.shared or vm.failover.pins:
            return None  # a failed-over VM runs where it is: never moved under it
        try:
            target = self.choose(view, vm, exclude=[vm.owner], shared_only=True)
        except PlacementError as exc:
            log.warning("cannot re-home VM %s from %s: %s", vm.vmid, vm.owner, exc)
            return None
        moved = replace(vm, owner=target, migrate_to="")
        if await self._swap(view, vm, moved):
            log.info(
                "node %s is down: VM %s (%s) re-homed to %s", vm.owner, vm.vmid, vm.name, target
            )
            return target
        return None

    async def _plan_move(self, view: ClusterView, vm: VMRecord) -> str | None:
        try:
            target = self.choose(view, vm, exclude=[vm.owner], shared_only=vm.shared)
        except PlacementError as exc:
            log.warning("draining %s: no node can take VM %s: %s", vm.owner, vm.vmid, exc)
            return None
        if await self._swap(view, vm, replace(vm, migrate_to=target)):
            log.info("draining %s: VM %s (%s) to move to %s", vm.owner, vm.vmid, vm.name, target)
            return target
        return None

    async def _swap(self, view: ClusterView, old: VMRecord, new: VMRecord) -> bool:
        key = self.keys.vm(old.vmid)
        result = await fenced_txn(
            self.store,
            self.keys,
            self.term,
            [Compare.mod_revision(key, "==", view.vm_revisions[old.vmid])],
            [Put(key, new.to_json())],
        )
        return result.succeeded


def _settled(vm: VMRecord, fine: set[str]) -> bool:
    """Nothing to do for this replica: on a node that is up and not draining, deleted, or
    failed over (the VM runs from it at its node: it must not move under the VM)."""
    return vm.owner in fine or vm.deleted or vm.failover.pins

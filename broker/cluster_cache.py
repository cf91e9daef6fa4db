"""The broker's in-memory copy of the cluster's records, kept current by a watch.

A query must not read thousands of VM records from the store: the broker loads them once
when its term starts, then applies every change the store reports (a watch from the
loaded revision), and its own writes as soon as they succeed. Answers for existing VMs
come from here in microseconds. Nothing is decided on the copy alone: every write the
broker makes compares revisions in a fenced transaction, so a copy that is a moment
behind only costs a retry (:meth:`ClusterCache.wait_for` the store's revision first).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from broker.cluster_view import ClusterView
from broker.placement import PlacementRule, RuleCache
from broker.records import (
    Keys,
    NodeAdmin,
    NodeRecord,
    NodeState,
    NodeView,
    PlacementCursor,
    RecordError,
    Settings,
    VMRecord,
)
from broker.store import ClusterStore, EventKind, KeyValue, StoreError

log = logging.getLogger("frrep.broker")


class ClusterCache:
    """Nodes, administrators' decisions, VMs, cursor and settings, as of :attr:`revision`."""

    def __init__(self, store: ClusterStore, keys: Keys) -> None:
        self.store = store
        self.keys = keys
        self.revision = 0
        self.nodes: dict[str, NodeRecord] = {}
        self.admin: dict[str, NodeAdmin] = {}
        self.vms: dict[str, VMRecord] = {}
        self.vm_revisions: dict[str, int] = {}
        #: ``{owner: [VM count, bytes]}`` of live VMs, kept as records change.
        self.owned: dict[str, list[int]] = {}
        self.cursor = PlacementCursor()
        self.cursor_revision = 0
        self.settings = Settings()
        #: The settings record's mod_revision (0: never set; a deletion's revision after one).
        self.settings_revision = 0
        self._rules = RuleCache()
        #: Counts changes of the node and node-admin records (tracking waits for them).
        self.membership_changes = 0
        self._changed = trio.Condition()
        #: :meth:`view`'s last answer, until the copy changes (a query asks for it each
        #: time; building it walks every node and the load table).
        self._view: ClusterView | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Load everything, then follow the store's changes until cancelled."""
        started = False
        while True:
            try:
                await self._load()
                if not started:
                    task_status.started()
                    started = True
                async with self.store.watch(
                    self.keys.prefix, start_revision=self.revision + 1
                ) as events:
                    async for event in events:
                        self._apply(event.kv, deleted=event.kind is EventKind.DELETE)
                        await self._advance(event.revision)
            except StoreError as exc:  # a broken watch, a compacted revision: load again
                log.warning("cluster cache: %s; reloading", exc)
                await trio.sleep(0.2)

    async def _load(self) -> None:
        kvs, revision = await self.store.range(self.keys.prefix)
        self._view = None
        self.nodes.clear()
        self.admin.clear()
        self.vms.clear()
        self.vm_revisions.clear()
        self.owned.clear()
        self.cursor, self.cursor_revision, self.settings = PlacementCursor(), 0, Settings()
        self.settings_revision = 0
        for kv in kvs:
            self._apply(kv, deleted=False)
        await self._advance(revision)

    async def _advance(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._view = None
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, revision: int, *, timeout: float = 2.0) -> None:
        """Return once the copy has caught up with ``revision`` (or after ``timeout``)."""
        with trio.move_on_after(timeout):
            async with self._changed:
                while self.revision < revision:
                    await self._changed.wait()

    async def wait_membership_change(self, seen: int, *, timeout: float) -> None:
        """Return once :attr:`membership_changes` passed ``seen`` (or after ``timeout``)."""
        with trio.move_on_after(timeout):
            async with self._changed:
                while self.membership_changes == seen:
                    await self._changed.wait()

    def put_vm(self, vm: VMRecord, revision: int) -> None:
        """Our own write succeeded at ``revision``: apply it now (the watch repeats it)."""
        self._set_vm(vm.vmid, vm)
        self.vm_revisions[vm.vmid] = revision

    def _set_vm(self, vmid: str, vm: VMRecord | None) -> None:
        self._view = None
        old = self.vms.pop(vmid, None)
        if old is not None and not old.deleted:
            count = self.owned[old.owner]
            count[0] -= 1
            count[1] -= old.size_bytes
        if vm is not None:
            self.vms[vmid] = vm
            if not vm.deleted:
                count = self.owned.setdefault(vm.owner, [0, 0])
                count[0] += 1
                count[1] += vm.size_bytes

    def put_cursor(self, cursor: PlacementCursor, revision: int) -> None:
        """Our own write of the cursor succeeded at ``revision``."""
        self._view = None
        self.cursor, self.cursor_revision = cursor, revision

    def _apply(self, kv: KeyValue, *, deleted: bool) -> None:
        k, key = self.keys, kv.key
        self._view = None
        try:
            if key.startswith((k.nodes, k.node_admin)):
                self.membership_changes += 1
            if key.startswith(k.nodes):
                name = key.removeprefix(k.nodes)
                if deleted:
                    self.nodes.pop(name, None)
                else:
                    self.nodes[name] = NodeRecord.from_json(kv.value)
            elif key.startswith(k.node_admin):
                name = key.removeprefix(k.node_admin)
                if deleted:
                    self.admin.pop(name, None)
                else:
                    self.admin[name] = NodeAdmin.from_json(kv.value)
            elif key.startswith(k.vms):
                vmid = key.removeprefix(k.vms)
                if deleted:
                    self._set_vm(vmid, None)
                    self.vm_revisions.pop(vmid, None)
                else:
                    self._set_vm(vmid, VMRecord.from_json(kv.value))
                    self.vm_revisions[vmid] = kv.mod_revision
            elif key == k.placement:
                if deleted:
                    self.cursor, self.cursor_revision = PlacementCursor(), 0
                else:
                    self.cursor = PlacementCursor.from_json(kv.value)
                    self.cursor_revision = kv.mod_revision
            elif key == k.settings:
                self.settings = Settings() if deleted else Settings.from_json(kv.value)
                # A DELETE event carries the deletion's revision: a new key for the rules.
                self.settings_revision = kv.mod_revision
        except RecordError as exc:
            log.warning("ignoring %s: %s", key, exc)

    def placement_rules(self, view: ClusterView) -> list[PlacementRule]:
        """The placement rules ``view``'s settings name, loaded once per settings revision
        (not per placement: see :class:`~broker.placement.RuleCache`).

        Raises :class:`~broker.placement.PlacementError` when one cannot be loaded.
        """
        return self._rules.rules(view.settings_revision, view.settings.placement_rules)

    def view(self) -> ClusterView:
        """The copy as a :class:`ClusterView` (shares the VM tables: do not modify); the
        same object until the copy changes."""
        if self._view is not None:
            return self._view
        nodes = {}
        for name, record in self.nodes.items():
            admin = self.admin.get(name, NodeAdmin())
            state = NodeState.DRAINING if admin.draining else NodeState.UP
            nodes[name] = NodeView(record, admin, state)
        self._view = ClusterView(
            revision=self.revision,
            nodes=nodes,
            admin=self.admin,
            vms=self.vms,
            vm_revisions=self.vm_revisions,
            cursor=self.cursor,
            cursor_revision=self.cursor_revision,
            settings=self.settings,
            owned={owner: (c[0], c[1]) for owner, c in self.owned.items()},
            settings_revision=self.settings_revision,
        )
        return self._view

"""One read of the cluster's state from the store, as the broker and the CLI see it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from broker.records import (
    AuditEntry,
    ConsoleAccount,
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
from broker.store import ClusterStore

log = logging.getLogger("frrep.broker")


@dataclass(frozen=True)
class ClusterView:
    """Nodes, VMs, cursor and settings at one store revision."""

    revision: int
    nodes: dict[str, NodeView]  #: the nodes that are up or draining (their lease is alive)
    admin: dict[str, NodeAdmin]  #: administrators' decisions, by node name
    vms: dict[str, VMRecord]  #: by VMID
    vm_revisions: dict[str, int]  #: each VM record's mod_revision (for compare-and-swap)
    cursor: PlacementCursor
    cursor_revision: int  #: 0 when the cursor was never written
    settings: Settings
    #: ``{owner: (VM count, bytes)}`` of live VMs, when the reader keeps it (the cache).
    owned: Mapping[str, tuple[int, int]] | None = None
    #: The settings record's ``mod_revision`` (0 when never set): what the placement rules
    #: are loaded for (``ClusterCache.placement_rules``).
    settings_revision: int = 0

    def owned_by(self, node: str) -> list[VMRecord]:
        """The live (not deleted) VMs a node owns."""
        return [v for v in self.vms.values() if v.owner == node and not v.deleted]


async def read_settings(store: ClusterStore, keys: Keys) -> Settings:
    """The cluster's settings (the defaults when never set)."""
    return (await _read_settings(store, keys))[0]


async def _read_settings(store: ClusterStore, keys: Keys) -> tuple[Settings, int]:
    kv = await store.get(keys.settings)
    if kv is None:
        return Settings(), 0
    return Settings.from_json(kv.value), kv.mod_revision


async def read_cluster(store: ClusterStore, keys: Keys) -> ClusterView:
    """Read everything placement and tracking need.

    The reads are not one snapshot; writes that depend on them compare revisions (the
    VM record's, the cursor's), so a stale read only costs a retry.
    """
    node_kvs, revision = await store.range(keys.nodes)
    admin_kvs, _ = await store.range(keys.node_admin)
    vm_kvs, _ = await store.range(keys.vms)
    cursor_kv = await store.get(keys.placement)
    admin: dict[str, NodeAdmin] = {}
    for kv in admin_kvs:
        try:
            admin[kv.key.removeprefix(keys.node_admin)] = NodeAdmin.from_json(kv.value)
        except RecordError as exc:
            log.warning("ignoring %s: %s", kv.key, exc)
    nodes: dict[str, NodeView] = {}
    for kv in node_kvs:
        try:
            rec = NodeRecord.from_json(kv.value)
        except RecordError as exc:
            log.warning("ignoring %s: %s", kv.key, exc)
            continue
        decided = admin.get(rec.name, NodeAdmin())
        state = NodeState.DRAINING if decided.draining else NodeState.UP
        nodes[rec.name] = NodeView(rec, decided, state)
    vms: dict[str, VMRecord] = {}
    vm_revisions: dict[str, int] = {}
    for kv in vm_kvs:
        try:
            vm = VMRecord.from_json(kv.value)
        except RecordError as exc:
            log.warning("ignoring %s: %s", kv.key, exc)
            continue
        vms[vm.vmid] = vm
        vm_revisions[vm.vmid] = kv.mod_revision
    cursor = PlacementCursor() if cursor_kv is None else PlacementCursor.from_json(cursor_kv.value)
    settings, settings_revision = await _read_settings(store, keys)
    return ClusterView(
        revision=revision,
        nodes=nodes,
        admin=admin,
        vms=vms,
        vm_revisions=vm_revisions,
        cursor=cursor,
        cursor_revision=0 if cursor_kv is None else cursor_kv.mod_revision,
        settings=settings,
        settings_revision=settings_revision,
    )


async def read_console_account(store: ClusterStore, keys: Keys) -> ConsoleAccount | None:
    """The web console's administrator account (``None``: no password set yet)."""
    kv = await store.get(keys.console_account)
    return None if kv is None else ConsoleAccount.from_json(kv.value)


async def read_audit(store: ClusterStore, keys: Keys, *, limit: int = 200) -> list[AuditEntry]:
    """The audit log's last ``limit`` entries, newest first (unreadable ones skipped)."""
    kvs, _ = await store.range(keys.audit)
    entries = []
    for kv in sorted(kvs, key=lambda kv: kv.key, reverse=True)[:limit]:
        try:
            entries.append(AuditEntry.from_json(kv.value))
        except RecordError as exc:
            log.warning("ignoring %s: %s", kv.key, exc)
    return entries

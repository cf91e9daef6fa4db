"""A change to a VM's record by the node that owns the VM, as a compare-and-swap.

Outcomes a node records for its own VMs (a planned failover taken over, a planned ask
declined) are best effort: the VM's state is durable on the node itself, and the record
only reports it. Each is a read, a change and a write compared on the revision read,
tried again while another writer (the broker, an administrator) changes the record.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from broker.records import Keys, VMRecord
from broker.store import ClusterStore, Compare, Put

#: Reads and writes tried before the change is given up.
TRIES = 10


class RecordKeptChanging(Exception):
    """Every try found the record changed by another writer in between."""


async def update_owned_record(
    store: ClusterStore,
    keys: Keys,
    vmid: uuid.UUID | str,
    node_name: str,
    change: Callable[[VMRecord], VMRecord | None],
) -> VMRecord | None:
    """Write ``change(record)`` as the VM record of ``vmid`` while node ``node_name`` owns
    it; the record written, or None when there is none, it is another node's, or
    ``change`` returned None (nothing to write).

    Raises:
        RecordKeptChanging: after :data:`TRIES` reads, each overtaken by another write.
        broker.store.StoreError, broker.records.RecordError: the store failed, or holds
            a record that does not load.
    """
    key = keys.vm(vmid)
    for _ in range(TRIES):
        kv = await store.get(key)
        if kv is None:
            return None
        vm = VMRecord.from_json(kv.value)
        if vm.owner != node_name:
            return None
        new = change(vm)
        if new is None:
            return None
        result = await store.txn(
            [Compare.mod_revision(key, "==", kv.mod_revision)], [Put(key, new.to_json())], []
        )
        if result.succeeded:
            return new
    raise RecordKeptChanging(f"the record of VM {vmid} kept changing")

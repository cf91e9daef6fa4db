"""A planned failover asked at the cluster (``broker/admin.py``): what may be asked, its
withdrawal, its audit entries, an unplanned failover that overrides it, and the node's
side that records a decline (``frcluster/planned_ask.py``), against SQLite and etcd."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from broker import admin
from broker.cluster_view import read_audit
from broker.records import FailoverState, Keys, NodeRecord, VMRecord
from broker.store import ClusterStore
from frcluster.planned_ask import PlannedAsks

NODE = "n1.example.com"


async def _vm(store: ClusterStore, keys: Keys, owner: str = NODE, **fields: Any) -> str:
    vmid = str(uuid.uuid4())
    await store.put(keys.vm(vmid), VMRecord(vmid, owner, "replicas", **fields).to_json())
    return vmid


async def _read(store: ClusterStore, keys: Keys, vmid: str) -> VMRecord:
    kv = await store.get(keys.vm(vmid))
    assert kv is not None
    return VMRecord.from_json(kv.value)


async def test_asked_only_of_a_vm_that_may_fail_over(store: ClusterStore, keys: Keys) -> None:
    cases = [
        (await _vm(store, keys, deleted=True), "was deleted"),
        (await _vm(store, keys, migrate_to="n2.example.com"), "is moving to n2.example.com"),
        (await _vm(store, keys, failover=FailoverState.DONE), "is failed over already (done)"),
        (
            await _vm(store, keys, failover=FailoverState.COMPLETED),
            "is failed over already (completed)",
        ),
        (
            await _vm(store, keys, failover=FailoverState.REQUESTED),
            "a failover is pending (requested)",
        ),
    ]
    for vmid, message in cases:
        with pytest.raises(admin.Refused, match=re.escape(message)):
            await admin.request_planned_failover(store, keys, vmid)
    with pytest.raises(admin.NoSuchVM):
        await admin.request_planned_failover(store, keys, uuid.uuid4())
    # Failed (a decline, a withdrawal): it may be asked again, the note cleared.
    vmid = await _vm(store, keys, failover=FailoverState.PLANNED_DECLINED, failover_note="declined")
    asked = await admin.request_planned_failover(store, keys, vmid, by="tester")
    assert (asked.new.failover, asked.new.failover_point, asked.new.failover_note) == (
        FailoverState.PLANNED_REQUESTED,
        -1,
        "",
    )
    with pytest.raises(admin.Refused, match=r"a failover is pending \(planned-requested\)$"):
        await admin.request_planned_failover(store, keys, vmid)
    with pytest.raises(admin.NoFailoverOutcome):
        await admin.await_failover(store, keys, vmid, timeout=0.2)
    [entry] = await read_audit(store, keys)
    assert (entry.who, entry.what, entry.target) == ("tester", "failover-planned", vmid)
    assert entry.changes["failover"] == ["planned-declined", "planned-requested"]


async def test_withdrawn_only_while_pending(store: ClusterStore, keys: Keys) -> None:
    vmid = await _vm(store, keys)
    await admin.request_planned_failover(store, keys, vmid)
    withdrawn = await admin.withdraw_planned_failover(
        store, keys, vmid, note="not answered within 2 s", by="tester"
    )
    assert withdrawn.new.failover is FailoverState.PLANNED_DECLINED
    assert withdrawn.new.failover_note == "not answered within 2 s"
    assert (await admin.await_failover(store, keys, vmid, timeout=1)).failover_note == (
        "not answered within 2 s"
    )
    entries = await read_audit(store, keys)
    assert entries[0].what == "failover-planned-withdraw"
    # An outcome recorded meanwhile is left as it is.
    done = await _vm(store, keys, failover=FailoverState.DONE, failover_generation=2)
    left = await admin.withdraw_planned_failover(store, keys, done, note="late")
    assert (left.new.failover, left.new.failover_note) == (FailoverState.DONE, "")


async def test_an_unplanned_failover_overrides_a_pending_planned_one(
    store: ClusterStore, keys: Keys
) -> None:
    vmid = await _vm(store, keys)
    await admin.request_planned_failover(store, keys, vmid)
    asked = await admin.request_failover(store, keys, vmid, point=4)
    assert (asked.new.failover, asked.new.failover_point) == (FailoverState.REQUESTED, 4)
    # The node reads the record when the primary opens: it asks nothing any more.
    asks = PlannedAsks(store, keys, NODE)
    asks.note(uuid.UUID(vmid), await _read(store, keys, vmid))
    assert not asks.asked(uuid.UUID(vmid))
    # A decline that comes late does not undo the unplanned failover.
    await asks.declined(uuid.UUID(vmid), "p1.example.com", "no stop hook")
    assert (await _read(store, keys, vmid)).failover is FailoverState.REQUESTED


async def test_the_node_asks_while_pending_and_records_a_decline(
    store: ClusterStore, keys: Keys
) -> None:
    vmid = await _vm(store, keys)
    key = uuid.UUID(vmid)
    asks = PlannedAsks(store, keys, NODE)
    asks.note(key, await _read(store, keys, vmid))
    assert not asks.asked(key)
    await admin.request_planned_failover(store, keys, vmid)
    asks.note(key, await _read(store, keys, vmid))
    assert asks.asked(key)
    asks.forget(key)  # a peer node's connection is never asked
    assert not asks.asked(key)
    asks.note(key, await _read(store, keys, vmid))
    await asks.declined(key, "p1.example.com", "the stop hook failed")
    assert not asks.asked(key)  # asked no more (FOV-18)
    record = await _read(store, keys, vmid)
    assert record.failover is FailoverState.PLANNED_DECLINED
    assert record.failover_note == "declined by its primary p1.example.com: the stop hook failed"
    # Another node's record is not its to write.
    theirs = await _vm(store, keys, owner="n2.example.com")
    await admin.request_planned_failover(store, keys, theirs)
    await asks.declined(uuid.UUID(theirs), "p1.example.com", "no")
    assert (await _read(store, keys, theirs)).failover is FailoverState.PLANNED_REQUESTED


async def test_a_declined_ask_leaves_the_vm_free_to_move(store: ClusterStore, keys: Keys) -> None:
    """A declined or withdrawn ask changed nothing: the VM replicates from its primary as
    before, so it may be migrated and re-homed; while the ask is pending it may not."""
    other = "n2.example.com"
    await store.put(keys.node(other), NodeRecord(other, "127.0.0.12", 7000).to_json())
    vmid = await _vm(store, keys)
    await admin.request_planned_failover(store, keys, vmid)
    assert (await _read(store, keys, vmid)).failover.pins
    with pytest.raises(admin.Refused, match="does not move"):
        await admin.request_migration(store, keys, vmid, other)
    await admin.withdraw_planned_failover(store, keys, vmid, note="not answered within 1 s")
    declined = await _read(store, keys, vmid)
    assert declined.failover is FailoverState.PLANNED_DECLINED
    assert not declined.failover.pins
    moved = await admin.request_migration(store, keys, vmid, other)
    assert moved.new.migrate_to == other
    # An unplanned failover that failed still pins the replica (unchanged behaviour).
    assert FailoverState.FAILED.pins
    assert not FailoverState.NONE.pins

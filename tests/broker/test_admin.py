"""The cluster's administration as a library (broker/admin.py), against SQLite and etcd.

The first test is the reason the library exists as it does: administrators at work at
the same moment, on one node's record and on the settings, lose none of each other's
changes (every write is a compare-and-swap). The others pin what is refused, with the
message ``frctl`` prints.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import trio

from broker import admin
from broker.records import (
    FailoverState,
    Keys,
    NodeAdmin,
    NodeRecord,
    PlacementPolicy,
    Settings,
    VMRecord,
)
from broker.store import (
    ClusterStore,
    Compare,
    KeyValue,
    Op,
    TxnResult,
    WatchEvent,
    open_store,
)

NODE = "n1.example.com"


class _Late(ClusterStore):
    """A store whose reads answer a little late, as over a network: the gap between an
    administrator's read and its write, made wide enough that administrators overlap."""

    def __init__(self, inner: ClusterStore, rng: random.Random) -> None:
        self.inner = inner
        self.rng = rng

    async def get(self, key: str) -> KeyValue | None:
        kv = await self.inner.get(key)
        await trio.sleep(self.rng.uniform(0, 0.02))
        return kv

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self.inner.range(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> int:
        return await self.inner.delete(key)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        return await self.inner.txn(compares, success, failure)

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        return self.inner.watch(prefix, start_revision=start_revision)

    async def grant_lease(self, ttl_s: float) -> int:
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease_id: int) -> float:
        return await self.inner.keepalive(lease_id)

    async def revoke(self, lease_id: int) -> None:
        await self.inner.revoke(lease_id)

    async def revision(self) -> int:
        return await self.inner.revision()

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Racing(_Late):
    """A store where another writer rewrites every record just after it is read."""

    async def get(self, key: str) -> KeyValue | None:
        kv = await self.inner.get(key)
        if kv is not None:
            await self.inner.put(key, kv.value)
        return kv


#: What the settings administrators set, one key each.
SETTINGS: dict[str, Any] = {
    "recovery_points": 7,
    "port": 7444,
    "default_storage": "replicas",
    "placement_policy": "least-loaded",
    "recovery_enabled": False,
    "placement_rules": ["maintenance"],
}
#: Administrators at once on the node record: each sets its own label, every other one
#: also drains the node. Nine writes in all: fewer than admin.ATTEMPTS, so that no
#: administrator can lose every attempt (each lost attempt is another's write landing).
NODE_ADMINS = 6


async def test_administrators_at_once_lose_no_update(store_url: str, keys: Keys) -> None:
    async with open_store(store_url) as store:
        await store.put(keys.node(NODE), NodeRecord(NODE, "127.0.0.11", 7000).to_json())
        # Set before they start: the drains must keep it, the labels must not drop it.
        await store.put(keys.admin(NODE), NodeAdmin(labels={"rack": "r1"}).to_json())

    async def node_admin(i: int) -> None:
        # Its own connection, as a separate administrator's tool would have.
        async with open_store(store_url) as own:
            late = _Late(own, random.Random(i))
            if i % 2:
                await admin.set_draining(late, keys, NODE)
            await admin.set_labels(late, keys, NODE, {f"a{i}": str(i)})

    async def settings_admin(i: int, name: str) -> None:
        async with open_store(store_url) as own:
            await admin.update_settings(
                _Late(own, random.Random(100 + i)), keys, {name: SETTINGS[name]}
            )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(NODE_ADMINS):
                nursery.start_soon(node_admin, i)
            for i, name in enumerate(SETTINGS):
                nursery.start_soon(settings_admin, i, name)

    async with open_store(store_url) as store:
        kv = await store.get(keys.admin(NODE))
        assert kv is not None
        decided = NodeAdmin.from_json(kv.value)
        settings_kv = await store.get(keys.settings)
        assert settings_kv is not None
        settings = Settings.from_json(settings_kv.value)
    assert decided.labels == {"rack": "r1", **{f"a{i}": str(i) for i in range(NODE_ADMINS)}}
    assert decided.draining
    assert {name: getattr(settings, name) for name in SETTINGS} == SETTINGS


async def _vm(store: ClusterStore, keys: Keys, owner: str = NODE, **fields: Any) -> str:
    vmid = str(uuid.uuid4())
    await store.put(keys.vm(vmid), VMRecord(vmid, owner, "replicas", **fields).to_json())
    return vmid


async def _read_vm(store: ClusterStore, keys: Keys, vmid: str) -> VMRecord:
    kv = await store.get(keys.vm(vmid))
    assert kv is not None
    return VMRecord.from_json(kv.value)


async def test_migration_is_asked_only_of_a_vm_that_may_move(
    store: ClusterStore, keys: Keys
) -> None:
    other = "n2.example.com"
    for name in (NODE, other):
        await store.put(keys.node(name), NodeRecord(name, "127.0.0.1", 7000).to_json())
    vmid = await _vm(store, keys)
    failed_over = await _vm(store, keys, failover=FailoverState.DONE)
    deleted = await _vm(store, keys, deleted=True)
    absent = str(uuid.uuid4())
    refusals: list[tuple[str, str, type[admin.AdminError], str]] = [
        ("not-a-uuid", other, admin.BadVMID, "badly formed hexadecimal UUID string"),
        (vmid, "n9.example.com", admin.NodeNotUp, "node n9.example.com is not up"),
        (vmid, NODE, admin.Refused, f"VM {vmid} is already on {NODE}"),
        (
            failed_over,
            other,
            admin.Refused,
            f"VM {failed_over} was failed over (done): it does not move",
        ),
        (absent, other, admin.NoSuchVM, f"the cluster has no VM {absent}"),
        (deleted, other, admin.Refused, f"VM {deleted} was deleted: it does not move"),
    ]
    for which, node, kind, message in refusals:
        with pytest.raises(kind) as refused:
            await admin.request_migration(store, keys, which, node)
        assert str(refused.value) == message
    done = await admin.request_migration(store, keys, uuid.UUID(vmid), other)
    assert done.old is not None
    assert (done.old.migrate_to, done.new.migrate_to) == ("", other)
    assert await _read_vm(store, keys, vmid) == done.new


async def test_failover_is_asked_once_and_its_outcome_awaited(
    store: ClusterStore, keys: Keys
) -> None:
    deleted = await _vm(store, keys, deleted=True)
    moving = await _vm(store, keys, migrate_to="n2.example.com")
    done = await _vm(store, keys, failover=FailoverState.DONE)
    for which, message in [
        (deleted, f"VM {deleted} was deleted"),
        (moving, f"VM {moving} is moving to n2.example.com; fail over after"),
        (done, f"VM {done}: a failover is already done"),
    ]:
        with pytest.raises(admin.Refused, match=f"^{re.escape(message)}$"):
            await admin.request_failover(store, keys, which)

    vmid = await _vm(store, keys, failover=FailoverState.FAILED, failover_note="earlier")
    asked = await admin.request_failover(store, keys, vmid, point=3)  # failed: may ask again
    assert (asked.new.failover, asked.new.failover_point, asked.new.failover_note) == (
        FailoverState.REQUESTED,
        3,
        "",
    )
    with pytest.raises(admin.Refused, match=r"a failover is already requested$"):
        await admin.request_failover(store, keys, vmid)
    with pytest.raises(admin.NoFailoverOutcome, match=r"^no outcome within 0\.2 s"):
        await admin.await_failover(store, keys, vmid, timeout=0.2)

    async def owner() -> None:  # what frcluster/failover.py records
        await trio.sleep(0.3)
        vm = await _read_vm(store, keys, vmid)
        outcome = VMRecord(
            **{**vm.__dict__, "failover": FailoverState.DONE, "failover_generation": 2}
        )
        await store.put(keys.vm(vmid), outcome.to_json())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        vm = await admin.await_failover(store, keys, vmid, timeout=10, poll=0.02)
    assert (vm.failover, vm.failover_generation) == (FailoverState.DONE, 2)


async def test_delete_and_node_decisions(store: ClusterStore, keys: Keys) -> None:
    vmid = await _vm(store, keys)
    deleted = await admin.delete_vm(store, keys, vmid)
    assert deleted.new.deleted
    assert (await _read_vm(store, keys, vmid)).deleted
    absent = str(uuid.uuid4())
    with pytest.raises(admin.NoSuchVM, match=f"^the cluster has no VM {absent}$"):
        await admin.delete_vm(store, keys, absent)

    # A node nobody decided anything about: no record, the defaults.
    labelled = await admin.set_labels(store, keys, NODE, {"a": "1", "b": "2"})
    assert labelled.old is None
    drained = await admin.set_draining(store, keys, NODE)
    assert drained.new == NodeAdmin(draining=True, labels={"a": "1", "b": "2"})
    relabelled = await admin.set_labels(store, keys, NODE, {"a": None, "c": "3"})
    assert relabelled.new == NodeAdmin(draining=True, labels={"b": "2", "c": "3"})
    undrained = await admin.set_draining(store, keys, NODE, draining=False)
    assert undrained.new == NodeAdmin(draining=False, labels={"b": "2", "c": "3"})


async def test_a_vm_is_found_by_vmid_or_by_a_name_only_one_vm_has(
    store: ClusterStore, keys: Keys
) -> None:
    web = await _vm(store, keys, name="web01")
    twins = sorted([await _vm(store, keys, name="db01"), await _vm(store, keys, name="db01")])
    assert await admin.find_vm(store, keys, "web01") == web
    assert await admin.find_vm(store, keys, web.upper()) == web
    with pytest.raises(admin.NoSuchVM, match=re.escape(f"({twins[0]}, {twins[1]})")):
        await admin.find_vm(store, keys, "db01")
    with pytest.raises(admin.NoSuchVM, match="the cluster has no VM 'mail01'"):
        await admin.find_vm(store, keys, "mail01")


async def test_settings_are_checked_before_anything_is_written(
    store: ClusterStore, keys: Keys
) -> None:
    known = ", ".join(Settings.__dataclass_fields__)
    with pytest.raises(admin.InvalidSetting) as refused:
        admin.parse_assignments(["recovery_points=3", "noequals"])
    assert str(refused.value) == f"'noequals': expected NAME=VALUE, NAME one of {known}"
    assert admin.parse_assignments(["placement_policy=random", "port=7", "port=8"]) == {
        "placement_policy": "random",
        "port": 8,
    }
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"bogus": 1}, f"'bogus': not a setting; one of {known}"),
        (
            {"placement_policy": "fastest"},
            "placement_policy 'fastest': one of round-robin, random, least-loaded, capacity-aware",
        ),
        ({"authorization": [{"primary": "x"}]}, "authorization entry #1: missing 'trust_group'"),
        ({"port": 70000}, "port 70000 out of range"),
        ({"default_storage": object()}, "Object of type object is not JSON serializable"),
    ]
    for updates, message in refusals:
        with pytest.raises(admin.InvalidSetting) as refused:
            await admin.update_settings(store, keys, updates)
        assert str(refused.value) == message
    with pytest.raises(admin.InvalidSetting, match=r"^placement rule 'no-such-rule': not"):
        await admin.update_settings(store, keys, {"placement_rules": ["no-such-rule"]})
    assert await store.get(keys.settings) is None

    first = await admin.update_settings(store, keys, {"recovery_points": 5})
    assert first.old is None
    assert first.new == Settings(recovery_points=5)
    second = await admin.update_settings(store, keys, {"placement_policy": "random"})
    assert second.old == first.new
    assert second.new.placement_policy is PlacementPolicy.RANDOM
    assert second.old.changes(second.new) == {"placement_policy": ("round-robin", "random")}


async def test_a_record_that_keeps_changing_is_not_overwritten(
    store: ClusterStore, keys: Keys
) -> None:
    vmid = await _vm(store, keys)
    await store.put(keys.admin(NODE), NodeAdmin(labels={"x": "1"}).to_json())
    racing = _Racing(store, random.Random(0))
    with pytest.raises(admin.Contended, match=r"^the VM's record kept changing; try again$"):
        await admin.delete_vm(racing, keys, vmid)
    with pytest.raises(
        admin.Contended, match=re.escape(f"{NODE}'s record kept changing; try again")
    ):
        await admin.set_labels(racing, keys, NODE, {"y": "2"})
    assert not (await _read_vm(store, keys, vmid)).deleted
    kv = await store.get(keys.admin(NODE))
    assert kv is not None
    assert NodeAdmin.from_json(kv.value).labels == {"x": "1"}


async def test_an_audited_change_and_its_entry_are_one_write(
    store: ClusterStore, keys: Keys
) -> None:
    from broker.cluster_view import read_audit

    vmid = await _vm(store, keys)
    for name in (NODE, "n2.example.com"):
        await store.put(keys.node(name), NodeRecord(name, "127.0.0.11", 1).to_json())
    # Refused, lost to a racing writer, or not audited: no entry.
    with pytest.raises(admin.Refused):
        await admin.request_migration(store, keys, vmid, NODE, by="alice")
    with pytest.raises(admin.Contended):
        await admin.delete_vm(_Racing(store, random.Random(1)), keys, vmid, by="alice")
    await admin.set_labels(store, keys, NODE, {"rack": "r1"})
    assert await read_audit(store, keys) == []
    # Made: the entry says who, what, old -> new, in the change's own transaction.
    moved = await admin.request_migration(store, keys, vmid, "n2.example.com", by="alice")
    await admin.update_settings(store, keys, {"recovery_points": 3}, by="bob")
    await admin.set_draining(store, keys, NODE, by="carol")
    entries = await read_audit(store, keys)
    assert [(e.who, e.what, e.target, e.changes) for e in entries] == [
        ("carol", "drain", NODE, {"draining": [False, True]}),
        ("bob", "settings", "settings", {"recovery_points": [24, 3]}),
        ("alice", "migrate", vmid, {"migrate_to": ["", "n2.example.com"]}),
    ]
    kvs, _ = await store.range(keys.audit)
    assert sorted(kv.mod_revision for kv in kvs)[0] == moved.revision


async def test_the_console_password_is_stored_hashed_and_checked(
    store: ClusterStore, keys: Keys
) -> None:
    from broker.cluster_view import read_console_account
    from frlink.passwords import verify_password

    with pytest.raises(admin.InvalidSetting, match="at least 8 characters"):
        await admin.set_console_password(store, keys, "admin", "short")
    with pytest.raises(admin.InvalidSetting, match="one word"):
        await admin.set_console_password(store, keys, "two words", "long enough")
    assert await read_console_account(store, keys) is None
    first = await admin.set_console_password(store, keys, "admin", "long enough")
    account = await read_console_account(store, keys)
    assert account == first.new
    assert "long enough" not in account.to_json().decode()
    assert verify_password("long enough", account.password_hash)
    assert not verify_password("long enougH", account.password_hash)
    second = await admin.set_console_password(store, keys, "admin", "long enough")
    assert second.new.session_secret != first.new.session_secret

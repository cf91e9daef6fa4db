"""Tracking decisions against a real store: draining spreads the moves, a down node's
shared replicas are re-homed, and every decision is a fenced write."""

from __future__ import annotations

import collections
import ssl
import uuid

import trio

from broker.cluster_view import read_cluster
from broker.election import Election, Term
from broker.records import (
    ElectionRecord,
    FailoverState,
    Keys,
    NodeAdmin,
    NodeRecord,
    PlacementPolicy,
    Settings,
    VMRecord,
)
from broker.service import Broker
from broker.store import ClusterStore


async def _term(store: ClusterStore, keys: Keys, nursery: trio.Nursery) -> Term:
    got: list[Term] = []

    async def lead(term: Term) -> None:
        got.append(term)
        await trio.sleep_forever()

    record = ElectionRecord("n0.example.com", "cap.example.com", "127.0.0.10", 1)
    nursery.start_soon(Election(store, keys, record, ttl=2.0).run, lead)
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    return got[0]


async def _cluster(store: ClusterStore, keys: Keys, nodes: int, *, shared: bool) -> None:
    for i in range(1, nodes + 1):
        node = NodeRecord(f"n{i}.example.com", f"127.0.0.{10 + i}", 7000, shared_storage=shared)
        await store.put(keys.node(node.name), node.to_json())


async def test_draining_spreads_the_moves_over_the_other_nodes(
    store: ClusterStore, keys: Keys
) -> None:
    await _cluster(store, keys, 4, shared=False)
    await store.put(
        keys.settings, Settings(placement_policy=PlacementPolicy.LEAST_LOADED).to_json()
    )
    for _ in range(6):
        vm = VMRecord(str(uuid.uuid4()), "n1.example.com", "replicas", size_bytes=1 << 20)
        await store.put(keys.vm(vm.vmid), vm.to_json())
    await store.put(keys.admin("n1.example.com"), NodeAdmin(draining=True).to_json())
    async with trio.open_nursery() as nursery:
        term = await _term(store, keys, nursery)
        broker = Broker(store, keys, term, term.record, ssl.create_default_context())
        await broker.tracker.reconcile(await read_cluster(store, keys))
        view = await read_cluster(store, keys)
        targets = collections.Counter(v.migrate_to for v in view.vms.values())
        # Six replicas over three other nodes: two each, not six on one.
        assert targets == {f"n{i}.example.com": 2 for i in (2, 3, 4)}
        nursery.cancel_scope.cancel()


async def test_a_down_nodes_shared_replicas_are_rehomed_and_spread(
    store: ClusterStore, keys: Keys
) -> None:
    await _cluster(store, keys, 3, shared=True)
    await store.put(keys.settings, Settings(placement_policy=PlacementPolicy.ROUND_ROBIN).to_json())
    for _ in range(4):  # owned by n9, which is not up (no node record)
        vm = VMRecord(str(uuid.uuid4()), "n9.example.com", "replicas", shared=True)
        await store.put(keys.vm(vm.vmid), vm.to_json())
    local = VMRecord(str(uuid.uuid4()), "n9.example.com", "replicas", shared=False)
    await store.put(keys.vm(local.vmid), local.to_json())
    async with trio.open_nursery() as nursery:
        term = await _term(store, keys, nursery)
        broker = Broker(store, keys, term, term.record, ssl.create_default_context())
        await broker.tracker.reconcile(await read_cluster(store, keys))
        view = await read_cluster(store, keys)
        owners = collections.Counter(v.owner for v in view.vms.values() if v.shared)
        assert sorted(owners.values()) == [1, 1, 2]
        assert "n9.example.com" not in owners
        assert view.vms[local.vmid].owner == "n9.example.com"  # waits for its node
        nursery.cancel_scope.cancel()


async def test_a_failed_over_vm_is_neither_rehomed_nor_drained(
    store: ClusterStore, keys: Keys
) -> None:
    await _cluster(store, keys, 3, shared=True)
    # n9 is down; n1 drains: both hold a VM failed over to its replica there.
    down = VMRecord(
        str(uuid.uuid4()), "n9.example.com", "r", shared=True, failover=FailoverState.DONE
    )
    draining = VMRecord(
        str(uuid.uuid4()), "n1.example.com", "r", shared=True, failover=FailoverState.DONE
    )
    moving = VMRecord(str(uuid.uuid4()), "n9.example.com", "r", shared=True)
    for vm in (down, draining, moving):
        await store.put(keys.vm(vm.vmid), vm.to_json())
    await store.put(keys.admin("n1.example.com"), NodeAdmin(draining=True).to_json())
    async with trio.open_nursery() as nursery:
        term = await _term(store, keys, nursery)
        broker = Broker(store, keys, term, term.record, ssl.create_default_context())
        await broker.tracker.reconcile(await read_cluster(store, keys))
        view = await read_cluster(store, keys)
        assert view.vms[down.vmid] == down  # it runs there: never moved under it
        assert view.vms[draining.vmid] == draining
        assert view.vms[moving.vmid].owner != "n9.example.com"  # the others still are
        nursery.cancel_scope.cancel()

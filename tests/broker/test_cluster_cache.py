"""The broker's copy of the cluster follows the store, and its per-node loads stay equal
to a recount after every kind of change."""

from __future__ import annotations

import random
import uuid
from dataclasses import replace

import trio

from broker.cluster_cache import ClusterCache
from broker.cluster_view import read_cluster
from broker.records import Keys, NodeRecord, VMRecord
from broker.store import ClusterStore


def _recount(vms: dict[str, VMRecord]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for vm in vms.values():
        if not vm.deleted:
            count, size = out.get(vm.owner, (0, 0))
            out[vm.owner] = (count + 1, size + vm.size_bytes)
    return out


async def test_the_copy_follows_the_store(store: ClusterStore, keys: Keys) -> None:
    rng = random.Random(3)
    for i in range(3):
        node = NodeRecord(f"n{i}.example.com", "127.0.0.1", 7000)
        await store.put(keys.node(node.name), node.to_json())
    vms: dict[str, VMRecord] = {}
    for _ in range(20):
        vm = VMRecord(str(uuid.uuid4()), f"n{rng.randrange(3)}.example.com", "r", size_bytes=7)
        vms[vm.vmid] = vm
        await store.put(keys.vm(vm.vmid), vm.to_json())
    cache = ClusterCache(store, keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        for step in range(40):  # moves, deletions, deleted flags, growth, new VMs
            vmid = rng.choice(list(vms))
            action = rng.choice(["move", "delete", "flag", "grow", "new"])
            if action == "delete":
                del vms[vmid]
                revision = await store.delete(keys.vm(vmid))
            else:
                vm = vms[vmid]
                if action == "move":
                    vm = replace(vm, owner=f"n{rng.randrange(3)}.example.com")
                elif action == "flag":
                    vm = replace(vm, deleted=not vm.deleted)
                elif action == "grow":
                    vm = replace(vm, size_bytes=vm.size_bytes + step)
                else:
                    vm = VMRecord(str(uuid.uuid4()), "n1.example.com", "r", size_bytes=3)
                vms[vm.vmid] = vm
                revision = await store.put(keys.vm(vm.vmid), vm.to_json())
            await cache.wait_for(revision, timeout=5)
            assert cache.revision >= revision
            assert cache.vms == vms
            assert {k: (c[0], c[1]) for k, c in cache.owned.items() if c[0]} == _recount(vms)
        view = cache.view()
        assert set(view.nodes) == {f"n{i}.example.com" for i in range(3)}
        assert view.vms == (await read_cluster(store, keys)).vms
        nursery.cancel_scope.cancel()

"""A primary deletes its relationship at a cluster node (RelationshipDelete): the replica
goes from the node, the VM's record from the store, and the broker forgets the VM (a new
query places it anew). Real node processes, a real primary."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from broker.store import KeyValue, open_store
from node.primary.client import RecoveryClient
from node.storage.layout import ReplicaLayout, tombstone_path
from tests.broker.cluster_site import (
    PRIMARY_ADDRESS,
    ClusterSite,
    node_address,
    node_name,
    primary_replicator,
    replica_path,
)
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner


async def _record(site: ClusterSite, vmid: uuid.UUID) -> KeyValue | None:
    async with open_store(site.store_url) as store:
        return await store.get(site.keys.vm(vmid))


async def _connect_node(site: ClusterSite, i: int) -> RecoveryClient:
    return await RecoveryClient.connect(
        node_address(i),
        site.running[i].port,
        server_name=node_name(i),
        ssl_context=site.primary_context(),
        local_address=PRIMARY_ADDRESS,
    )


def test_a_deleted_vm_leaves_the_node_and_the_cluster(tmp_path: Path) -> None:
    site = ClusterSite(tmp_path, nodes=2)
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(43)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        trio.run(cycle_until_done, primary_replicator(site, vmid, [image]))
        vm = owner(site, vmid)
        where = index(vm.owner)
        replica = replica_path(site, where, vmid)
        assert replica.read_bytes() == image.read_bytes()
        layout = ReplicaLayout(site.storage(where) / "replicas", vmid)

        async def delete() -> None:
            with trio.fail_after(30):
                await _delete()

        async def _delete() -> None:
            client = await _connect_node(site, where)
            try:
                assert client.negotiated.recovery_type is fp.RecoveryType.CLUSTER_NODE
                accepted = await client.open(vmid, name=vm.name, disks=(), create=False)
                assert accepted.ir_state is fp.IRState.COMPLETE
                await client.delete_relationship(vmid)
                assert client.conn.connection.state is fp.State.READY
                # The cluster has no record of it now: the node does not hold it.
                with pytest.raises(fp.VMNotHere):
                    await client.open(vmid, name=vm.name, disks=(), create=False)
            finally:
                await client.aclose()

        trio.run(delete)
        # The record went with the replica (no DELETED flag: the primary asked itself).
        assert trio.run(_record, site, vmid) is None
        assert not layout.dir.exists()
        assert not tombstone_path(site.storage(where) / "replicas", vmid).exists()
        assert "its primary deleted it; record removed" in site.running[where].text()

        async def asked_again() -> fp.QueryRecoveryServerResponse:
            # The broker answers from its copy of the store: NEW within moments.
            with trio.fail_after(5):
                while True:
                    answer = await site.query(vmid)
                    if answer.existing is fp.ExistingVM.NEW:
                        return answer
                    await trio.sleep(0.05)

        placed = trio.run(asked_again)
        record = trio.run(_record, site, vmid)
        assert record is not None  # placed anew by that query
        # The primary may seed it again from nothing: a new relationship and a full IR.
        again = primary_replicator(site, vmid, [image])
        trio.run(cycle_until_done, again)
        assert again.state.ir_state == "COMPLETE"
        assert again.state.node_name == placed.server_name
        assert replica_path(site, index(placed.server_name), vmid).read_bytes() == (
            image.read_bytes()
        )
    finally:
        site.stop_all()

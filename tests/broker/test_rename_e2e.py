"""A create resent to a cluster node with another VM name and config blob (the VM renamed
and reconfigured on its primary, REP-28): the node's replica takes both, and the VM's
record in the cluster store takes the name. Real node processes."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import trio

import frproto as fp
from broker.records import VMRecord
from node.storage.layout import ReplicaLayout
from node.storage.state import ReplicaState
from tests.broker.cluster_site import ClusterSite, primary_replicator
from tests.broker.test_delete_e2e import _connect_node, _record
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner


def test_a_resent_create_renames_the_vm_on_its_node_and_in_the_cluster(tmp_path: Path) -> None:
    site = ClusterSite(tmp_path, nodes=2)
    try:
        site.start_all()
        site.authorize_primary()
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", random.Random(7))
        trio.run(cycle_until_done, primary_replicator(site, vmid, [image]))
        vm = owner(site, vmid)
        where = index(vm.owner)
        disks = (fp.DiskInfo("disk0", image.stat().st_size),)

        async def resend() -> fp.RelationshipAccepted:
            with trio.fail_after(30):
                client = await _connect_node(site, where)
                try:
                    return await client.open(vmid, name="web-renamed", disks=disks, config=b"v2")
                finally:
                    await client.aclose()

        accepted = trio.run(resend)
        assert accepted.ir_state is fp.IRState.COMPLETE  # the same relationship
        layout = ReplicaLayout(site.storage(where) / "replicas", vmid)
        assert ReplicaState.from_bytes(layout.state.read_bytes()).name == "web-renamed"
        assert layout.config.read_bytes() == b"v2"
        record = trio.run(_record, site, vmid)
        assert record is not None
        assert VMRecord.from_json(record.value).name == "web-renamed"
    finally:
        site.stop_all()

"""Where a replica is copied from one node to another (migration on local storage).

The owner speaks the replication protocol to the target node as a client, with its node
certificate (the target admits the cluster's nodes, see ``ClusterNode._authorize``):
RelationshipCreate with the VM's name, disks and config blob, then an IR of the replica's
images as they are at its latest recovery point, at that point's sequence. Every chunk
carries its digest and is verified by the target before it is written, exactly as a
primary's IR; zero ranges travel as flags, so sparse replicas stay sparse. The target's
replica then continues at the same sequence: the primary's next batch applies there.

The owner holds the VM meanwhile (no batch can change it). Only the latest point travels:
older recovery points stay behind and are removed with the local copy.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import frproto as fp
from broker.records import NodeRecord, VMRecord
from frlink.tls import client_context
from node.primary.client import RecoveryClient

if TYPE_CHECKING:
    from .agent import ClusterNode

log = logging.getLogger("frrep.node")


async def send_replica(node: ClusterNode, vm: VMRecord, target: NodeRecord) -> None:
    """Copy ``vm``'s replica from ``node`` to ``target`` (raises on any failure: the
    move is then not made and is tried again later)."""
    vmid = uuid.UUID(vm.vmid)
    store = await node.server.store_for(node.config.storage / vm.storage)
    replica = store.open(vmid)
    if replica.ir_state is not fp.IRState.COMPLETE:
        raise fp.Busy(f"VM {vm.vmid} has no complete replica to move yet")
    images = [replica.image_path(i) for i in range(len(replica.disks))]
    tls = node.config.tls
    ctx = client_context(tls.cert, tls.key, tls.ca)
    client = await RecoveryClient.connect(
        target.address, target.port, server_name=target.name, ssl_context=ctx
    )
    try:
        accepted = await client.open(
            vmid, name=replica.name, disks=replica.disks, config=replica.config_blob(), create=True
        )
        if accepted.ir_state is fp.IRState.COMPLETE and (
            accepted.applied_sequence == replica.applied_sequence
        ):
            return  # copied by an earlier attempt whose switch did not happen
        log.info("copying VM %s (%s) to %s", vm.vmid, vm.name, target.name)
        await client.send_ir(vmid, images, sequence=replica.applied_sequence)  # waits for the ack
    finally:
        await client.aclose()

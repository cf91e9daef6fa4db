"""Reverse replication in a cluster, asked through the store (``frctl cluster reverse``).

After a failover (``frctl cluster failover``, or a planned failover from the primary),
the VM runs from its replica at the owning node. ``frctl cluster reverse VMID --to
HOST:PORT`` writes the destination in the VM's record (``VMRecord.reverse_to``,
``broker/admin.py``); the owner, which follows the records, then replicates the VM
there, from the replica's image files, differences first, with its own TLS identity
(``node/failover/reverse_service.py``: a primary service of the node's, its state in
``reverse-primary/`` beside the node's storage locations). The destination is a recovery
server holding the VM's replica at the failed-over generation: the former primary's,
after ``frctl failover adopt``, or any other. The record shows the new direction.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import trio

from broker.records import FailoverState, Keys, VMRecord
from broker.store import ClusterStore
from node.failover.reverse_service import ReverseReplication
from node.primary.state import PrimaryStateStore

from .requests import RETRY_SECONDS, follow_requests, owned_requests

if TYPE_CHECKING:
    from .agent import ClusterNode

log = logging.getLogger("frrep.node")


class ReverseRunner:
    """Starts the reverse replication asked of this node's failed-over VMs."""

    def __init__(self, node: ClusterNode, store: ClusterStore, keys: Keys) -> None:
        self.node = node
        self.store = store
        self.keys = keys
        config = node.server.config
        self.reverse = ReverseReplication(
            name=config.name,
            tls=config.tls,
            listen=config.listen,
            state_dir=node.config.storage / "reverse-primary",
            frequency_s=config.reverse_frequency_s,
        )

    async def run(self) -> None:
        """Run the node's reverse replication until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reverse.run)
            select = owned_requests(
                self.node.config.name,
                lambda raw: b"reverse_to" in raw,
                lambda vm: (
                    bool(vm.reverse_to) and vm.failover is FailoverState.DONE and not vm.deleted
                ),
            )
            await follow_requests(self.store, self.keys, select, self._start)

    def _reversing(self, vmid: str) -> bool:
        if not self.reverse.state_dir.is_dir():
            return False
        return any(s.vmid == vmid for s in PrimaryStateStore(self.reverse.state_dir).all())

    async def _start(self, vm: VMRecord, revision: int) -> None:
        if await trio.to_thread.run_sync(self._reversing, vm.vmid):
            return
        host, _, port = vm.reverse_to.rpartition(":")
        try:
            await self.reverse.taken_over(
                uuid.UUID(vm.vmid),
                storage=self.node.config.storage / vm.storage,
                primary_name=vm.reverse_name or host,
                primary_address=host,
                reverse_port=int(port),
            )
        except Exception as exc:
            log.warning("reverse replication of %s not started: %s; later", vm.vmid, exc)
            await trio.sleep(RETRY_SECONDS)

"""Where a VM's replica lives: the configured target, a clustering broker there, and the
recovery node the broker names.

The configured target may be a recovery cluster's CAP: when it negotiates as
``CLUSTERING_BROKER`` the broker is remembered (in the VM's state), asked which node
holds the VM (``QueryRecoveryServer``), and the replica is reached over a new connection
whose TLS name is the node's FQDN. Later cycles go straight to the remembered node; a
node that answers ``VM_NOT_HERE`` (the replica moved) sends the session back to the
broker, at most :data:`MAX_REQUERIES` times. Names are resolved through the primary's
``[hosts]`` table, then DNS (``node.primary.resolve``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import frproto as fp

from .client import RecoveryClient
from .errors import UNREACHABLE, ReplicationHalted
from .record import VMRecord
from .resolve import resolve_host
from .state import IRStage

log = logging.getLogger("frrep.primary")

#: How often one cycle asks the broker again after a node said "VM not here" (or could
#: not be reached) before the cycle fails and the normal retry with backoff takes over.
#: Bounded so that a broker and a node that disagree cannot keep a cycle spinning.
MAX_REQUERIES = 3


@dataclass(frozen=True)
class Route:
    """Connects to where one VM's replica lives, following a clustering broker.

    Attributes:
        vm: the VM (its state holds the target, the broker and the node; changes to them
            are saved).
        ssl_context: client TLS context (our certificate, the CA).
        local_address: the address to connect from, if any.
        compression: the methods offered at negotiation.
        hosts: name -> IP address table, consulted before DNS.
    """

    vm: VMRecord
    ssl_context: ssl.SSLContext
    local_address: str | None
    compression: fp.CompressionSet
    hosts: Mapping[str, str]

    async def dial(self, host: str, port: int, server_name: str) -> RecoveryClient:
        """Resolve ``host`` (``[hosts]`` table, then DNS), connect and negotiate with SNI
        ``server_name``."""
        address = await resolve_host(host, port, self.hosts)
        return await RecoveryClient.connect(
            address,
            port,
            server_name=server_name,
            ssl_context=self.ssl_context,
            local_address=self.local_address,
            compression=self.compression,
        )

    async def connect(self) -> RecoveryClient:
        """This cycle's connection: the remembered node, else the configured target."""
        s = self.vm.state
        # During an IR the broker is asked every cycle: a Create sent to a node that no
        # longer holds the VM would seed a second replica there instead of being refused.
        if s.broker is None or not s.node_name or s.ir_state != IRStage.COMPLETE:
            return await self.discover()
        try:
            return await self.connect_node()
        except UNREACHABLE as exc:
            # The node may be down and the cluster may have moved the replica elsewhere:
            # the broker knows. If it still names the same node, this cycle fails.
            log.warning(
                "%s: recovery node %s unreachable (%s); asking the broker %s",
                s.name,
                s.node_name,
                exc,
                s.broker,
            )
            before = (s.node_name.lower(), s.node_port)
            client = await self.discover()
            if (s.node_name.lower(), s.node_port) == before:
                await client.aclose()
                raise
            return client

    async def discover(self) -> RecoveryClient:
        """Connect to the configured target. A clustering broker there is remembered and
        asked for the VM's node, and the connection to that node is returned; any other
        recovery server is replicated to directly."""
        s = self.vm.state
        client = await self.dial(s.recovery_host, s.recovery_port, s.server_name)
        if not client.is_broker:
            if s.broker is not None:
                log.warning(
                    "%s: %s answers as %s, no longer as a clustering broker; replicating "
                    "to it directly",
                    s.name,
                    s.server_name,
                    client.negotiated.recovery_type.name,
                )
                s.broker, s.broker_host, s.broker_port = None, "", 0
                s.node_name, s.node_address, s.node_port = "", "", 0
                self.vm.save()
            return client
        if s.broker is None:
            log.info("%s: %s is a clustering broker", s.name, s.server_name)
        s.broker, s.broker_host, s.broker_port = s.server_name, s.recovery_host, s.recovery_port
        try:
            await self.ask_broker(client)
        finally:
            await client.aclose()  # the protocol: a new connection to the named node
        return await self.connect_node()

    async def ask_broker(self, client: RecoveryClient) -> None:
        """Ask the broker where the VM lives; remember the node it names.

        Raises:
            ReplicationHalted: the cluster deleted the replica, or knows none although
                the IR completed.
        """
        s = self.vm.state
        answer = await client.query(
            self.vm.vmid, name=s.name, disk_sizes=tuple(d.size for d in self.vm.disks)
        )
        if answer.existing is fp.ExistingVM.DELETED:
            s.node_name, s.node_address, s.node_port = "", "", 0
            self.vm.save()
            raise ReplicationHalted(
                f"an administrator deleted the replica of VM {s.name} ({s.vmid}) in the "
                f"recovery cluster (broker {s.broker}); replication stopped and will not "
                f"seed a new replica on its own: a person must decide (to replicate the "
                f"VM again from scratch, disable and enable its replication)"
            )
        if answer.existing is fp.ExistingVM.NEW and s.ir_state == IRStage.COMPLETE:
            # Our IR completed, yet the cluster knows no replica: replicating on would
            # need a new full IR, which is never started silently.
            raise ReplicationHalted(
                f"the recovery cluster (broker {s.broker}) holds no replica of VM {s.name} "
                f"({s.vmid}) although its initial replication completed"
                f"{f' on {s.node_name}' if s.node_name else ''}; a person must decide (to "
                f"replicate the VM again from scratch, disable and enable its replication)"
            )
        before = s.node_name
        if before and (before.lower(), s.node_port) != (answer.server_name.lower(), answer.port):
            log.warning("vm %s moved: %s -> %s", s.name, before, answer.server_name)
        elif before:
            log.info("%s: the broker still names %s", s.name, before)
        else:
            log.info(
                "%s: the broker names %s:%d (%s)",
                s.name,
                answer.server_name,
                answer.port,
                answer.existing.name,
            )
        if (before, s.node_port) != (answer.server_name, answer.port):
            s.node_address = ""
        s.node_name, s.node_port = answer.server_name, answer.port
        self.vm.save()

    async def connect_node(self) -> RecoveryClient:
        """Connect to the remembered recovery node, its FQDN as the TLS name."""
        s = self.vm.state
        client = await self.dial(s.node_name, s.node_port, s.node_name)
        if client.is_broker:
            await client.aclose()
            raise fp.FrprotoError(f"{s.node_name} answered as a clustering broker, not a node")
        address = client.peer_address
        if address is not None and address != s.node_address:
            s.node_address = address
            self.vm.save()
        return client

    async def follow(
        self,
        session: Callable[[RecoveryClient], Awaitable[None]],
        closing: Callable[[RecoveryClient], None],
    ) -> None:
        """Run ``session`` on this cycle's connection; a node that answers "VM not here"
        sends it back to the broker and on to the node it names now (at most
        :data:`MAX_REQUERIES` times). ``closing`` sees every connection before it is
        closed."""
        client = await self.connect()
        try:
            requeries = 0
            while True:
                try:
                    await session(client)
                    break
                except fp.VMNotHere as exc:
                    if self.vm.state.broker is None or requeries >= MAX_REQUERIES:
                        raise
                    requeries += 1
                    log.info("%s: %s; asking the broker again", self.vm.name, exc)
                closing(client)
                await client.aclose()
                client = await self.discover()
        finally:
            closing(client)
            await client.aclose()

    async def open_existing(
        self, *, generation: int = 0
    ) -> tuple[RecoveryClient, fp.RelationshipAccepted]:
        """A connection to where the replica lives, its relationship opened (never
        created), presenting ``generation`` (0: none).

        Raises:
            frproto.OutOfSequence: the initial replication is not done.
        """
        s = self.vm.state
        if s.ir_state != IRStage.COMPLETE:
            raise fp.OutOfSequence(f"{s.name}: its initial replication is not done")
        client = await self.connect()
        try:
            try:
                accepted = await client.open(
                    self.vm.vmid,
                    name=s.name,
                    disks=self.vm.disks,
                    create=False,
                    generation=generation,
                )
            except fp.VMNotHere:
                if s.broker is None:
                    raise
                await client.aclose()
                client = await self.discover()
                accepted = await client.open(
                    self.vm.vmid,
                    name=s.name,
                    disks=self.vm.disks,
                    create=False,
                    generation=generation,
                )
        except BaseException:
            await client.aclose()
            raise
        return client, accepted

    async def delete_replica(self) -> None:
        """Remove the replica where it lives (a broker is asked where that is); a replica
        the recovery side does not hold is not an error."""
        s = self.vm.state
        client = await (self.connect_node() if s.broker and s.node_name else self.discover())
        try:
            for attempt in range(MAX_REQUERIES + 1):
                try:
                    await client.open(
                        self.vm.vmid,
                        name=s.name,
                        disks=self.vm.disks,
                        create=False,
                        generation=s.generation,
                    )
                except fp.UnknownVM:
                    log.info("%s: the recovery side holds no replica to remove", s.name)
                    return
                except fp.VMNotHere:
                    if s.broker is None or attempt == MAX_REQUERIES:
                        raise
                    await client.aclose()
                    client = await self.discover()
                    continue
                await client.delete_relationship(self.vm.vmid)
                log.info("%s: the recovery side removed its replica", s.name)
                return
        finally:
            await client.aclose()

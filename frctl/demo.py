"""The loopback demo: a primary talks to a clustering broker and to recovery nodes.

Until the real broker and node agent exist (later issues), the far side here is a small
stand-in built on the same library: a "broker" at its own CAP address that places VMs
round-robin from an in-memory table, and two "recovery nodes" that keep chunks in memory.
Every byte between them is real frproto over TCP on distinct 127.x addresses, and every
message is printed as it crosses. (TLS arrives with the stand-alone replication issue;
this demo runs the protocol over plain TCP.)

What it shows:
1. negotiate at the CAP: the answer says "clustering broker";
2. QueryRecoveryServer for new VMs: placed round-robin on the nodes; the same VM again:
   "existing"; a VM an administrator deleted: "deleted", and the primary stops for it;
3. at the node: negotiate ("cluster node"), create the relationship, IR with a zero
   block that is never sent, a delta batch, acks;
4. the replica "moved": the wrong node answers VM_NOT_HERE, the primary asks the broker
   again and carries on at the right node, with no person involved.
"""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import dataclass, field

import trio

import frproto as fp
from frproto.trio_io import FramedStream

CAP = "127.0.0.10"
NODES = ("127.0.0.11", "127.0.0.12")
BLOCK = 1024 * 1024


@dataclass
class Printer:
    """Prints each message that crosses, with who sent it to whom."""

    verbose: bool
    lines: list[str] = field(default_factory=list)

    def show(self, sender: str, receiver: str, message: object) -> None:
        line = f"  {sender:>10} -> {receiver:<10} {fp.describe(message)}"
        self.lines.append(line)
        if self.verbose:
            print(line)

    def say(self, text: str) -> None:
        if self.verbose:
            print(text)


@dataclass
class StandInCluster:
    """The far side: a broker's placement table and each node's stored chunks."""

    ports: dict[str, int] = field(default_factory=dict)
    placement: dict[uuid.UUID, str] = field(default_factory=dict)
    deleted: set[uuid.UUID] = field(default_factory=set)
    images: dict[str, dict[uuid.UUID, bytearray]] = field(default_factory=dict)
    cursor: itertools.cycle[str] = field(default_factory=lambda: itertools.cycle(NODES))


async def _serve_broker(cluster: StandInCluster, stream: trio.SocketStream) -> None:
    conn = FramedStream(stream, fp.Connection(fp.Role.RECOVERY))
    policy = fp.ServerPolicy(fp.RecoveryType.CLUSTERING_BROKER, CAP, encryption=fp.Encryption.NONE)
    async with stream:
        request = await conn.expect(fp.NegotiateRequest)
        assert isinstance(request, fp.NegotiateRequest)
        await conn.send(fp.answer_negotiation(request, policy))
        while True:
            event = await conn.next_event()
            if not isinstance(event, fp.QueryRecoveryServer):
                return
            if event.vmid in cluster.deleted:
                existing, node = fp.ExistingVM.DELETED, NODES[0]
            elif event.vmid in cluster.placement:
                existing, node = fp.ExistingVM.EXISTING, cluster.placement[event.vmid]
            else:
                existing, node = fp.ExistingVM.NEW, next(cluster.cursor)
                cluster.placement[event.vmid] = node
            await conn.send(
                fp.QueryRecoveryServerResponse(event.vmid, node, cluster.ports[node], existing)
            )


async def _serve_node(cluster: StandInCluster, name: str, stream: trio.SocketStream) -> None:
    conn = FramedStream(stream, fp.Connection(fp.Role.RECOVERY))
    policy = fp.ServerPolicy(fp.RecoveryType.CLUSTER_NODE, name, encryption=fp.Encryption.NONE)
    images = cluster.images.setdefault(name, {})
    async with stream:
        request = await conn.expect(fp.NegotiateRequest)
        assert isinstance(request, fp.NegotiateRequest)
        await conn.send(fp.answer_negotiation(request, policy))
        while True:
            event = await conn.next_event()
            if isinstance(event, (fp.RelationshipCreate, fp.RelationshipOpen)):
                if cluster.placement.get(event.vmid) != name:
                    await conn.send_error(fp.VMNotHere(f"{event.vmid} is not on {name}"))
                    continue
                if isinstance(event, fp.RelationshipCreate):
                    images[event.vmid] = bytearray(event.disks[0].size)
                    disks = event.disks
                else:
                    disks = (fp.DiskInfo("disk0", len(images[event.vmid])),)
                await conn.send(fp.RelationshipAccepted(event.vmid, disks))
            elif isinstance(event, fp.Chunk):
                assert conn.connection.vmid is not None
                image = images[conn.connection.vmid]
                end = event.offset + event.length
                # frproto already checked the digest and that the range lies in the disk.
                image[event.offset : end] = bytes(event.length) if event.is_zero else event.data
            elif isinstance(event, fp.IREnd):
                await conn.send(fp.Ack(event.vmid, fp.AckKind.IR_COMPLETE, event.sequence))
            elif isinstance(event, fp.BatchEnd):
                await conn.send(fp.Ack(event.vmid, fp.AckKind.BATCH_APPLIED, event.sequence))
            elif isinstance(event, (fp.IRBegin, fp.BatchBegin, fp.Keepalive)):
                pass
            else:
                return


class Primary:
    """The primary side of the demo, printing every message it sends and receives."""

    def __init__(self, printer: Printer) -> None:
        self.printer = printer
        self.broker: str | None = None

    async def connect(self, host: str, port: int, label: str) -> tuple[FramedStream, str]:
        stream = await trio.open_tcp_stream(host, port)
        conn = FramedStream(stream, fp.Connection(fp.Role.PRIMARY))
        offer = fp.NegotiateRequest(encryption=fp.EncryptionSet.NONE)
        await self.send(conn, offer, label)
        answer = await self.receive(conn, label)
        assert isinstance(answer, fp.NegotiateResponse)
        assert answer.ok, f"negotiation refused: {answer}"
        if answer.recovery_type is fp.RecoveryType.CLUSTERING_BROKER:
            self.broker = host  # remembered: "not here" later sends us back to it
        return conn, label

    async def send(self, conn: FramedStream, message: fp.Message, to: str) -> None:
        self.printer.show("primary", to, message)
        await conn.send(message)

    async def receive(self, conn: FramedStream, sender: str) -> fp.Event:
        event = await conn.next_event()
        self.printer.show(sender, "primary", event)
        return event


async def _demo(printer: Printer) -> dict[str, object]:
    cluster = StandInCluster()
    summary: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host=CAP)
        cluster.ports[CAP] = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, lambda s: _serve_broker(cluster, s), listeners)
        for node in NODES:
            node_listeners = await trio.open_tcp_listeners(0, host=node)
            cluster.ports[node] = node_listeners[0].socket.getsockname()[1]
            nursery.start_soon(
                trio.serve_listeners,
                lambda s, node=node: _serve_node(cluster, node, s),
                node_listeners,
            )
        primary = Primary(printer)
        vms = [uuid.UUID(bytes=_rfc_guid(n)) for n in (1, 2, 3)]
        gone = uuid.UUID(bytes=_rfc_guid(99))
        cluster.deleted.add(gone)

        printer.say(f"\n1. Negotiate at the broker's CAP ({CAP}):")
        cap, label = await primary.connect(CAP, cluster.ports[CAP], "broker")
        printer.say("\n2. Where should each VM's replica live?")
        where: dict[uuid.UUID, tuple[str, int]] = {}
        for index, vmid in enumerate([*vms, vms[0], gone]):
            await primary.send(cap, fp.QueryRecoveryServer(vmid, f"vm{index}", (4 * BLOCK,)), label)
            answer = await primary.receive(cap, label)
            assert isinstance(answer, fp.QueryRecoveryServerResponse)
            if answer.existing is fp.ExistingVM.DELETED:
                printer.say(
                    f"     primary: {vmid} was deleted at the recovery site; "
                    "stopping for an administrator (no re-seed)"
                )
                summary["deleted_vm_stopped"] = True
                continue
            where[vmid] = (answer.server_name, answer.port)
        summary["placement"] = {str(k): v[0] for k, v in where.items()}
        await cap.aclose()

        vm = vms[0]
        node, port = where[vm]
        printer.say(f"\n3. Replicate {vm} at its node {node}: IR, then one delta batch")
        conn, nlabel = await primary.connect(node, port, f"node {node[-2:]}")
        disks = (fp.DiskInfo("disk0", 4 * BLOCK),)
        await primary.send(conn, fp.RelationshipCreate(vm, "vm0", disks, b"<vm config>"), nlabel)
        await primary.receive(conn, nlabel)
        image = bytearray(os.urandom(4 * BLOCK))
        image[2 * BLOCK : 3 * BLOCK] = bytes(BLOCK)  # a zero block: sent as a flag, no data
        await primary.send(conn, fp.IRBegin(vm, 0, 0, 0, len(image)), nlabel)
        for offset in range(0, len(image), BLOCK):
            block = memoryview(image)[offset : offset + BLOCK]
            await conn.send_chunk(0, offset, block)
        printer.say(f"  {'primary':>10} -> {nlabel:<10} 4 x Chunk (1 MiB each; one ZERO)")
        await primary.send(
            conn,
            fp.IREnd(vm, 0, conn.connection.chunk_count, conn.connection.aggregate_digest),
            nlabel,
        )
        await primary.receive(conn, nlabel)
        image[0:4096] = os.urandom(4096)
        await primary.send(conn, fp.BatchBegin(vm, 1, 0, 1, 4096), nlabel)
        await conn.send_chunk(0, 0, memoryview(image)[0:4096])
        printer.say(f"  {'primary':>10} -> {nlabel:<10} 1 x Chunk (4 KiB)")
        await primary.send(
            conn,
            fp.BatchEnd(vm, 1, conn.connection.chunk_count, conn.connection.aggregate_digest),
            nlabel,
        )
        await primary.receive(conn, nlabel)
        await conn.aclose()
        summary["replica_equals_primary"] = cluster.images[node][vm] == image

        other = NODES[1] if node == NODES[0] else NODES[0]
        printer.say(f"\n4. The primary reaches the wrong node ({other}) for {vm}:")
        conn, olabel = await primary.connect(other, cluster.ports[other], f"node {other[-2:]}")
        await primary.send(conn, fp.RelationshipOpen(vm), olabel)
        refusal = await primary.receive(conn, olabel)
        await conn.aclose()
        assert isinstance(refusal, fp.Error)
        assert refusal.error_code is fp.ErrorCode.VM_NOT_HERE
        assert primary.broker is not None
        printer.say("     primary: VM not here; asking the broker it remembers")
        cap, label = await primary.connect(primary.broker, cluster.ports[CAP], "broker")
        await primary.send(cap, fp.QueryRecoveryServer(vm, "vm0", (4 * BLOCK,)), label)
        answer = await primary.receive(cap, label)
        await cap.aclose()
        assert isinstance(answer, fp.QueryRecoveryServerResponse)
        conn, nlabel = await primary.connect(answer.server_name, answer.port, f"node {node[-2:]}")
        await primary.send(conn, fp.RelationshipOpen(vm), nlabel)
        reopened = await primary.receive(conn, nlabel)
        await conn.aclose()
        summary["followed_after_not_here"] = isinstance(reopened, fp.RelationshipAccepted)
        nursery.cancel_scope.cancel()
    return summary


def _rfc_guid(n: int) -> bytes:
    """A fixed, valid (RFC 9562 variant, version 4) GUID for demo VM number ``n``."""
    return uuid.UUID(int=(0x0DE0_0000_0000_4000_8000_0000_0000_0000 | n)).bytes


def run_demo(*, verbose: bool = True) -> int:
    """Run the demo; print the conversation and a summary. Returns 0 when all went well."""
    printer = Printer(verbose)
    printer.say("frproto loopback demo: a primary, a clustering broker at its CAP, two nodes")
    printer.say("(stand-in broker and nodes over plain TCP, so encryption NONE is negotiated;")
    printer.say(" the real node agent, broker and mutual TLS come with the next issues)")
    summary = trio.run(_demo, printer)
    ok = (
        summary.get("replica_equals_primary") is True
        and summary.get("followed_after_not_here") is True
        and summary.get("deleted_vm_stopped") is True
    )
    print("\nsummary:")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"  messages shown: {len(printer.lines)}")
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1

"""The primary and a clustering broker: discovery, query, DELETED, a moved replica followed.

On loopback, each "host" with its own 127.x address and certificate:

* a small fake clustering broker at the CAP (``cap.example.com`` on 127.0.0.10): a Trio
  TLS listener that negotiates as ``CLUSTERING_BROKER`` with frproto and answers
  ``QueryRecoveryServer`` from a dict the test controls, counting the queries;
* two real recovery servers in process, answering as cluster nodes
  (``n1.example.com`` on 127.0.0.11, ``n2.example.com`` on 127.0.0.12), each with its own
  replica storage; they record the TLS SNI names they were reached by;
* the primary (``VMReplicator``) on 127.0.0.3, configured with the CAP's address only;
  the node names resolve through its ``[hosts]`` table, never through real DNS.

A migration is simulated between cycles (the VM idle): the replica's directory is copied
from n1's storage to n2's and deleted on n1 (which then answers VM_NOT_HERE), and the
broker is pointed at n2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import shutil
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from frlink.authz import Authorization, AuthorizationEntry
from frlink.certs import create_ca, issue_host_cert
from frlink.tls import (
    ConnectFailure,
    TLSFailure,
    client_context,
    server_context,
    tls_handshake_server,
)
from frproto.trio_io import FramedStream
from frtesting.replicas import applied_image
from node.config import ConfigError, RecoveryServerConfig, TLSFiles
from node.primary.config import load_primary_config
from node.primary.replicator import MAX_REQUERIES, ReplicationHalted, VMReplicator
from node.primary.resolve import resolve_host
from node.primary.state import PrimaryStateStore, VMReplicationState
from node.recovery_server import RecoveryServer

MIB = 1024 * 1024
CAP_NAME = "cap.example.com"
CAP_HOST = "127.0.0.10"
NODES = {"n1.example.com": "127.0.0.11", "n2.example.com": "127.0.0.12"}
N1, N2 = "n1.example.com", "n2.example.com"
PRIMARY_NAME = "p1.primary.example.com"
PRIMARY_HOST = "127.0.0.3"
#: Every test finishes well within this (seconds).
DEADLINE = 60


def _recording_context(ctx: ssl.SSLContext, seen: list[str]) -> ssl.SSLContext:
    """``ctx`` that records the SNI name of every handshake (None: no SNI)."""

    def callback(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name or "")

    ctx.sni_callback = callback
    return ctx


@dataclass
class FakeBroker:
    """A clustering broker at the CAP that answers from ``answers`` (vmid -> node)."""

    ssl_context: ssl.SSLContext
    answers: dict[uuid.UUID, tuple[str, int, fp.ExistingVM]] = field(default_factory=dict)
    queries: list[uuid.UUID] = field(default_factory=list)
    sni: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=CAP_HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            tls = await tls_handshake_server(stream, self.ssl_context, timeout=5)
            conn = FramedStream(tls, fp.Connection(fp.Role.RECOVERY))
            request = await conn.expect(fp.NegotiateRequest)
            assert isinstance(request, fp.NegotiateRequest)
            policy = fp.ServerPolicy(fp.RecoveryType.CLUSTERING_BROKER, CAP_NAME)
            await conn.send(fp.answer_negotiation(request, policy))
            while True:
                event = await conn.next_event()
                if isinstance(event, fp.QueryRecoveryServer):
                    self.queries.append(event.vmid)
                    name, port, existing = self.answers[event.vmid]
                    await conn.send(
                        fp.QueryRecoveryServerResponse(event.vmid, name, port, existing)
                    )
                elif isinstance(event, (fp.ConnectionClosed, fp.Error)):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, TLSFailure, fp.FrprotoError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@dataclass
class Node:
    """A real recovery server in process, as a cluster node."""

    name: str
    storage: Path
    port: int
    sni: list[str]

    def image(self, vmid: uuid.UUID, disk_index: int = 0) -> Path:
        return applied_image(self.storage, vmid, f"disk{disk_index}")

    def holds(self, vmid: uuid.UUID) -> bool:
        return (self.storage / str(vmid) / "state.json").is_file()


@dataclass
class Cluster:
    """The loopback site: certificates, the fake broker, two nodes, the primary's state."""

    root: Path
    broker: FakeBroker
    nodes: dict[str, Node]
    nursery: trio.Nursery
    broker_scope: trio.CancelScope

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def replicator(self, vmid: uuid.UUID, images: list[Path]) -> VMReplicator:
        """A replicator configured with the CAP's address only (as ``enable`` writes it)."""
        store = PrimaryStateStore(self.root / "primary-state")
        if store.exists(str(vmid)):
            state = store.load(str(vmid))  # a restarted primary: from the persisted state
        else:
            state = VMReplicationState(
                vmid=str(vmid),
                name=f"vm-{str(vmid)[:4]}",
                disks=[
                    {"disk_id": f"disk{i}", "path": str(p), "size": p.stat().st_size}
                    for i, p in enumerate(images)
                ],
                recovery_host=CAP_HOST,
                recovery_port=self.broker.port,
                server_name=CAP_NAME,
                frequency_s=0.2,
            )
            store.save(state)
        ctx = client_context(
            self.certs / f"{PRIMARY_NAME}.pem",
            self.certs / f"{PRIMARY_NAME}-key.pem",
            self.certs / "ca.pem",
        )
        return VMReplicator(state, store, ctx, local_address=PRIMARY_HOST, hosts=dict(NODES))

    async def start_broker(self) -> None:
        """(Re)start the broker on its port (a CAP that moved comes back there)."""
        self.broker_scope = trio.CancelScope()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with self.broker_scope:
                await self.broker.serve(task_status=task_status)

        await self.nursery.start(run)

    def stop_broker(self) -> None:
        self.broker_scope.cancel()

    def move(self, vmid: uuid.UUID, source: str, target: str) -> None:
        """Migrate a replica between nodes (the VM idle): copy it, delete it at the source,
        and point the broker at the target."""
        src, dst = self.nodes[source], self.nodes[target]
        shutil.copytree(src.storage / str(vmid), dst.storage / str(vmid))
        shutil.rmtree(src.storage / str(vmid))  # no tombstone: "not here", not "deleted"
        self.broker.answers[vmid] = (target, dst.port, fp.ExistingVM.EXISTING)


def _make_certs(certs: Path) -> None:
    create_ca(certs)
    issue_host_cert(certs, certs, CAP_NAME, ip_addresses=[CAP_HOST])
    for name, address in NODES.items():
        issue_host_cert(certs, certs, name, ip_addresses=[address])
    issue_host_cert(certs, certs, PRIMARY_NAME, ip_addresses=[PRIMARY_HOST])


@asynccontextmanager
async def running_cluster(root: Path) -> AsyncIterator[Cluster]:
    """Certificates, the fake broker and two nodes on loopback; all stop on exit."""
    certs = root / "certs"
    _make_certs(certs)
    broker_ctx = server_context(
        certs / f"{CAP_NAME}.pem", certs / f"{CAP_NAME}-key.pem", certs / "ca.pem"
    )
    broker = FakeBroker(broker_ctx)
    broker.ssl_context = _recording_context(broker_ctx, broker.sni)
    async with trio.open_nursery() as nursery:
        nodes = {}
        for name, address in NODES.items():
            tls = TLSFiles(certs / f"{name}.pem", certs / f"{name}-key.pem", certs / "ca.pem")
            storage = root / f"replicas-{name.split('.')[0]}"
            config = RecoveryServerConfig(
                name=name,
                listen=address,
                port=0,
                tls=tls,
                authorization=Authorization(
                    entries=(AuthorizationEntry("*.primary.example.com", storage, "site-a"),)
                ),
                recovery_points=4,
            )
            sni: list[str] = []
            ctx = _recording_context(server_context(tls.cert, tls.key, tls.ca), sni)
            server = RecoveryServer(
                config, ssl_context=ctx, recovery_type=fp.RecoveryType.CLUSTER_NODE
            )
            listeners = await nursery.start(server.serve)
            nodes[name] = Node(name, storage, listeners[0].socket.getsockname()[1], sni)
        cluster = Cluster(root, broker, nodes, nursery, trio.CancelScope())
        await cluster.start_broker()
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


def make_image(path: Path, size: int, rng: random.Random) -> Path:
    data = bytearray(rng.randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 4)  # a zero region, never sent
    path.write_bytes(data)
    return path


def scribble(path: Path, rng: random.Random, writes: int = 5) -> None:
    """Random writes, as a running VM would make between cycles."""
    size = path.stat().st_size
    with path.open("r+b") as image:
        for _ in range(writes):
            length = rng.choice([512, 4096, 65536, 150_000])
            image.seek(rng.randrange(0, size - length))
            image.write(rng.randbytes(length))


def _vm(rng: random.Random, root: Path) -> tuple[uuid.UUID, Path]:
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    return vmid, make_image(root / f"{vmid}.img", 2 * MIB + 4096, rng)


# --------------------------------------------------------------------------------------
# the cases of the issue


async def test_new_vm_discovers_broker_and_goes_straight_to_its_node(tmp_path: Path) -> None:
    rng = random.Random(1)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1 = cluster.nodes[N1]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()  # discovery, query, IR on n1
            assert n1.image(vmid).read_bytes() == image.read_bytes()
            assert not cluster.nodes[N2].holds(vmid)
            assert cluster.broker.queries == [vmid]
            assert cluster.broker.sni == [CAP_NAME]
            assert n1.sni == [N1]  # SNI (and the certificate check) = the node's name
            saved = replicator.store.load(str(vmid))
            assert (saved.broker, saved.broker_host, saved.broker_port) == (
                CAP_NAME,
                CAP_HOST,
                cluster.broker.port,
            )
            assert (saved.node_name, saved.node_address, saved.node_port) == (
                N1,
                NODES[N1],
                n1.port,
            )
            assert saved.ir_state == "COMPLETE"
            assert saved.halted is None

            for cycle in (1, 2):  # straight to n1: the broker is not asked again
                scribble(image, rng)
                await replicator.cycle()
                assert n1.image(vmid).read_bytes() == image.read_bytes()
                assert replicator.state.sequence == cycle
            assert cluster.broker.queries == [vmid]

            # A restarted primary (a new replicator from the persisted state) too.
            scribble(image, rng)
            again = cluster.replicator(vmid, [image])
            await again.cycle()
            assert n1.image(vmid).read_bytes() == image.read_bytes()
            assert cluster.broker.queries == [vmid]
            assert n1.sni == [N1] * 4


async def test_moved_replica_is_followed_within_one_cycle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(2)
    vmid, image = _vm(rng, tmp_path)
    caplog.set_level(logging.INFO, logger="frrep.primary")
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1, n2 = cluster.nodes[N1], cluster.nodes[N2]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            scribble(image, rng)
            await replicator.cycle()
            assert n1.image(vmid).read_bytes() == image.read_bytes()
            assert len(cluster.broker.queries) == 1

            cluster.move(vmid, N1, N2)
            scribble(image, rng)  # the disk changes: this cycle's batch goes to n2
            await replicator.cycle()
            assert len(cluster.broker.queries) == 2  # exactly one re-query
            assert n2.image(vmid).read_bytes() == image.read_bytes()
            assert not n1.holds(vmid)  # nothing was seeded again on n1
            assert replicator.state.sequence == 2
            assert replicator.pending.cycles() == []
            saved = replicator.store.load(str(vmid))
            assert (saved.node_name, saved.node_address, saved.node_port) == (
                N2,
                NODES[N2],
                n2.port,
            )
            moved = [r.getMessage() for r in caplog.records if "moved" in r.getMessage()]
            assert moved == [f"vm {replicator.state.name} moved: {N1} -> {N2}"]

            for cycle in (3, 4):  # n2 from now on, without the broker
                scribble(image, rng)
                await replicator.cycle()
                assert n2.image(vmid).read_bytes() == image.read_bytes()
                assert replicator.state.sequence == cycle
            assert len(cluster.broker.queries) == 2
            assert n2.sni == [N2] * 3


async def test_pending_cycles_survive_a_move_and_reach_the_new_node(tmp_path: Path) -> None:
    """Cycles captured while no node could be reached are sent to the new node, in order;
    none is dropped before its ack."""
    rng = random.Random(3)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n2 = cluster.nodes[N2]
            cluster.broker.answers[vmid] = (N1, cluster.nodes[N1].port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            for _ in range(2):  # captured, not yet sent
                scribble(image, rng)
                await replicator.capture()
            assert [c.sequence for c in replicator.pending.cycles()] == [1, 2]
            cluster.move(vmid, N1, N2)
            scribble(image, rng)
            await replicator.cycle()  # captures 3, follows to n2, sends 1, 2, 3
            assert replicator.state.sequence == 3
            assert replicator.pending.cycles() == []
            assert n2.image(vmid).read_bytes() == image.read_bytes()
            assert len(cluster.broker.queries) == 2


async def test_requeries_are_bounded_then_the_cycle_fails_and_retries(tmp_path: Path) -> None:
    """A broker that still names the old node (not told of the move yet): at most
    MAX_REQUERIES re-queries, then a retryable VMNotHere; nothing pending is dropped, and
    the next cycle, once the broker knows, delivers it."""
    rng = random.Random(4)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1, n2 = cluster.nodes[N1], cluster.nodes[N2]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            cluster.move(vmid, N1, N2)
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.EXISTING)  # stale
            scribble(image, rng)
            with pytest.raises(fp.VMNotHere):
                await replicator.cycle()
            assert len(cluster.broker.queries) == 1 + MAX_REQUERIES
            assert [c.sequence for c in replicator.pending.cycles()] == [1]
            assert replicator.state.halted is None
            assert replicator.state.sequence == 0
            assert not n1.holds(vmid)  # never re-created on the wrong node

            cluster.broker.answers[vmid] = (N2, n2.port, fp.ExistingVM.EXISTING)
            scribble(image, rng)
            await replicator.cycle()
            assert replicator.state.sequence == 2
            assert replicator.pending.cycles() == []
            assert n2.image(vmid).read_bytes() == image.read_bytes()


async def test_new_after_completed_ir_halts(tmp_path: Path) -> None:
    """The cluster says NEW although our IR completed: never a silent full IR."""
    rng = random.Random(10)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1, n2 = cluster.nodes[N1], cluster.nodes[N2]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            shutil.rmtree(n1.storage / str(vmid))
            cluster.broker.answers[vmid] = (N2, n2.port, fp.ExistingVM.NEW)
            with pytest.raises(ReplicationHalted, match="holds no replica"):
                await replicator.cycle()
            assert not n2.holds(vmid)
            assert n2.sni == []


async def test_deleted_replica_halts_without_seeding(tmp_path: Path) -> None:
    rng = random.Random(5)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1 = cluster.nodes[N1]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.DELETED)
            replicator = cluster.replicator(vmid, [image])
            for _ in range(2):  # a later cycle still does not seed
                with pytest.raises(ReplicationHalted) as halted:
                    await replicator.cycle()
                message = str(halted.value)
                assert "administrator deleted the replica" in message
                assert "a person must decide" in message
                assert n1.sni == []
                assert cluster.nodes[N2].sni == []
                assert not n1.holds(vmid)
                assert not cluster.nodes[N2].holds(vmid)
            saved = replicator.store.load(str(vmid))
            assert saved.halted == message
            assert saved.health == "critical"
            assert saved.broker == CAP_NAME
            assert saved.node_name == ""

            # The long-running loop stops on it instead of retrying.
            with trio.fail_after(10):
                await replicator.run()
            assert not n1.holds(vmid)

            # Status shows it (and the broker), text and JSON.
            config = _primary_config(cluster)
            rows = _status(config, json_output=True)
            assert rows[0]["halted"] == message
            assert (rows[0]["state"], rows[0]["health"]) == ("halted", "critical")
            assert rows[0]["broker"]["name"] == CAP_NAME
            assert rows[0]["recovery_node"] is None
            assert "administrator deleted the replica" in _status_text(config)


async def test_replica_deleted_after_ir_halts_without_seeding(tmp_path: Path) -> None:
    """Replicating normally; an administrator deletes the replica (gone from n1, the
    broker says DELETED): the primary halts and never creates it again."""
    rng = random.Random(6)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1 = cluster.nodes[N1]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            shutil.rmtree(n1.storage / str(vmid))
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.DELETED)
            scribble(image, rng)
            with pytest.raises(ReplicationHalted, match="administrator deleted"):
                await replicator.cycle()
            assert not n1.holds(vmid)
            assert not cluster.nodes[N2].holds(vmid)
            assert replicator.state.halted is not None


async def test_broker_down_then_up(tmp_path: Path) -> None:
    rng = random.Random(7)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1 = cluster.nodes[N1]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            cluster.stop_broker()  # its node died; the CAP is not up elsewhere yet
            await trio.sleep(0.05)
            with pytest.raises(ConnectFailure):  # an OSError: retryable, not a halt
                await replicator.cycle()
            assert replicator.state.halted is None
            assert not n1.holds(vmid)

            # The real loop: it retries with backoff and succeeds once the CAP is back.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(replicator.run)
                await trio.sleep(0.3)
                await cluster.start_broker()  # same address and port
                while replicator.state.ir_state != "COMPLETE":
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            assert n1.image(vmid).read_bytes() == image.read_bytes()
            assert replicator.state.node_name == N1
            assert cluster.broker.queries == [vmid]


async def test_unreachable_node_asks_the_broker(tmp_path: Path) -> None:
    """The remembered node cannot be reached (its address now leads nowhere): the broker
    is asked once; it names the other node, which holds the replica now."""
    rng = random.Random(8)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1, n2 = cluster.nodes[N1], cluster.nodes[N2]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            replicator = cluster.replicator(vmid, [image])
            await replicator.cycle()
            cluster.move(vmid, N1, N2)
            replicator.hosts = {**NODES, N1: "127.0.0.99"}  # n1 "died": nothing listens
            scribble(image, rng)
            await replicator.cycle()
            assert len(cluster.broker.queries) == 2
            assert replicator.state.node_name == N2
            assert n2.image(vmid).read_bytes() == image.read_bytes()


# --------------------------------------------------------------------------------------
# name resolution, configuration, status


def _primary_config(cluster: Cluster) -> Path:
    path = cluster.root / "primary.toml"
    path.write_text(
        f"""
[primary]
name = "{PRIMARY_NAME}"
state_dir = "primary-state"
local_address = "{PRIMARY_HOST}"

[tls]
cert = "certs/{PRIMARY_NAME}.pem"
key = "certs/{PRIMARY_NAME}-key.pem"
ca = "certs/ca.pem"

[hosts]
"{N1}" = "{NODES[N1]}"
"{N2}" = "{NODES[N2]}"
"""
    )
    return path


def _status(config: Path, *, json_output: bool) -> Any:
    from frctl.node_commands import _cmd_status

    args = argparse.Namespace(config=str(config), json=json_output, check=False, watch=None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _cmd_status(args)
    return json.loads(out.getvalue())["vms"] if json_output else out.getvalue()


def _status_text(config: Path) -> str:
    text = _status(config, json_output=False)
    assert isinstance(text, str)
    return text


async def test_status_shows_broker_and_node(tmp_path: Path) -> None:
    rng = random.Random(9)
    vmid, image = _vm(rng, tmp_path)
    with trio.fail_after(DEADLINE):
        async with running_cluster(tmp_path) as cluster:
            n1 = cluster.nodes[N1]
            cluster.broker.answers[vmid] = (N1, n1.port, fp.ExistingVM.NEW)
            await cluster.replicator(vmid, [image]).cycle()
            config = _primary_config(cluster)
            assert load_primary_config(config).hosts == NODES
            (row,) = _status(config, json_output=True)
            assert row["broker"] == {
                "name": CAP_NAME,
                "host": CAP_HOST,
                "port": cluster.broker.port,
            }
            assert row["recovery_node"] == {"name": N1, "address": NODES[N1], "port": n1.port}
            assert row["halted"] is None
            assert f"{N1}:{n1.port} via broker {CAP_NAME}" in _status_text(config)


class _FakeResolver(trio.abc.HostnameResolver):
    """Stands in for DNS: names answer 127.0.0.42, and every lookup is recorded."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def getaddrinfo(self, host: bytes | str | None, port: Any, *args: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.asked.append(name)
        if name == "unknown.example.com":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.42", port))]

    async def getnameinfo(self, *args: Any) -> Any:
        raise NotImplementedError


async def test_resolution_hosts_table_before_dns() -> None:
    resolver = _FakeResolver()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        hosts = {N1: NODES[N1]}
        assert await resolve_host("N1.Example.COM.", 7443, hosts) == NODES[N1]
        assert await resolve_host("127.0.0.7", 7443, hosts) == "127.0.0.7"
        assert await resolve_host("::1", 7443, hosts) == "::1"
        assert resolver.asked == []  # neither went to DNS
        assert await resolve_host(N2, 7443, hosts) == "127.0.0.42"
        assert resolver.asked == [N2]
        with pytest.raises(OSError, match=r"cannot resolve unknown\.example\.com"):
            await resolve_host("unknown.example.com", 7443, hosts)
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('"n1.example.com" = "not-an-address"', "is not an IP address"),
        ('n1.example.com = "127.0.0.11"', "quote dotted names"),
        ('"" = "127.0.0.11"', "empty host name"),
    ],
)
def test_hosts_table_errors(tmp_path: Path, table: str, error: str) -> None:
    path = tmp_path / "primary.toml"
    path.write_text(
        f"""
[primary]
name = "p1.example.com"
state_dir = "state"

[tls]
cert = "c.pem"
key = "k.pem"
ca = "ca.pem"

[hosts]
{table}
"""
    )
    with pytest.raises(ConfigError, match=error):
        load_primary_config(path)


def test_state_round_trip_with_broker_fields(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path)
    state = VMReplicationState(
        vmid=str(uuid.uuid4()),
        name="vm",
        disks=[],
        recovery_host=CAP_HOST,
        recovery_port=7443,
        server_name=CAP_NAME,
        broker=CAP_NAME,
        broker_host=CAP_HOST,
        broker_port=7443,
        node_name=N1,
        node_address=NODES[N1],
        node_port=7444,
        halted="why",
    )
    store.save(state)
    assert store.load(state.vmid) == state
    state.node_port = 70000
    with pytest.raises(ValueError, match="port"):
        store.save(state)

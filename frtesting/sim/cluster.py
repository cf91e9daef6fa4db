"""A simulated recovery cluster: 3 to 5 production node agents (``frcluster``) sharing one
SQLite cluster store whose leases run on the simulated clock, the broker elected among
them at the CAP, and the primaries of :mod:`frtesting.sim.world` replicating through the
CAP. Faults: a node killed (the broker's too) and started again, with or without power
loss; a primary killed; a primary's links cut.

Administrators act too: a migration, a drain, a settings change, a failover. Checked
(issue 19's numbers): #1 once quiet, every VM's replica on the node its record names
equals its primary's disks; #2 no write fenced by a broker's term accepted after a later
term's; #3 no VM held by two nodes, no record naming a node that does not hold it; #4 no
primary halted; #5 after every restart of a node, no batch it acknowledged for a VM it
still owns is lost; #7 a failed-over VM is acknowledged no batch from its former primary.
"""

from __future__ import annotations

import random
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from broker import admin
from broker.records import FailoverState, Keys, Settings, VMRecord
from broker.store import StoreError
from broker.store.sqlite import SqliteStore
from frcluster.agent import ClusterNode
from frcluster.config import ClusterNodeConfig
from frlink import network
from frlink.tls import server_context
from node.config import TLSFiles
from node.storage import ReplicaStore

from .faults import Fault
from .invariants import check_points
from .store import FencedWrites, NodeStore
from .world import (
    CAP_ADDRESS,
    CAP_NAME,
    CAP_PORT,
    PRIMARY_DOMAIN,
    HostFiles,
    World,
    node_address,
    node_name,
    power_cut,
)

NODE_PORT = 7443
LEASE_TTL = 5.0


@dataclass
class SimNode:
    """One node agent's host: its storage, and its agent while it runs."""

    index: int
    storage: Path
    agent: ClusterNode | None = None
    store: NodeStore | None = None
    io: HostFiles | None = None
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None
    generation: int = 0
    #: Highest sequence acknowledged per VM while this node owned it (#5).
    acked: dict[uuid.UUID, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return node_name(self.index)

    @property
    def address(self) -> str:
        return node_address(self.index)


class ClusterWorld(World):
    """The cluster's site: nodes, the store, the CAP, and the primaries."""

    def __init__(self, root: Path, certs: Path, seed: int, **options: Any) -> None:
        shape = random.Random(f"{seed}:cluster")
        count = shape.randint(3, 5)
        hosts = {node_name(i): node_address(i) for i in range(count)}
        super().__init__(
            root,
            certs,
            seed,
            lambda line: None,
            target=(CAP_ADDRESS, CAP_PORT, CAP_NAME),
            hosts=hosts,
        )
        self.db = root / "cluster.db"
        self.keys = Keys()
        self.fenced = FencedWrites(self.keys.election)
        #: VMs failed over (done), with the sequence their primary was acknowledged then.
        self.failed_over: dict[uuid.UUID, int] = {}
        #: The digest of each (VM, sequence) any recovery point recorded, on any node
        #: (#8: a migration copies the points, a restart keeps them).
        self.digests: dict[tuple[str, int], str] = {}
        self.nodes = [SimNode(i, root / f"node{i + 1}") for i in range(count)]
        for node in self.nodes:
            (node.storage / "replicas").mkdir(parents=True)

    def _config(self, node: SimNode) -> ClusterNodeConfig:  # type: ignore[override]
        certs = self.certs
        return ClusterNodeConfig(
            name=node.name,
            listen=node.address,
            port=NODE_PORT,
            storage=node.storage,
            shared_storage=False,
            capacity_bytes=1 << 30,
            store_url=f"sqlite://{self.db}",
            prefix=self.keys.prefix,
            cap_name=CAP_NAME,
            cap_address=CAP_ADDRESS,
            cap_port=CAP_PORT,
            lease_ttl=LEASE_TTL,
            tls=TLSFiles(
                certs / f"{node.name}.pem", certs / f"{node.name}-key.pem", certs / "ca.pem"
            ),
        )

    def _store(self) -> SqliteStore:
        store = SqliteStore(self.db, poll_interval=0.5)
        store.clock = trio.current_time  # the leases run on the simulated clock
        return store

    async def set_settings(self) -> None:
        store = self._store()
        try:
            settings = Settings(
                authorization=[
                    {
                        "primary": f"*.{PRIMARY_DOMAIN}",
                        "storage": "replicas",
                        "trust_group": "site-a",
                    }
                ],
                recovery_points=self.recovery_points,
            )
            await store.put(self.keys.settings, settings.to_json())
        finally:
            await store.aclose()

    async def start_node(self, nursery: trio.Nursery, node: SimNode) -> None:
        node.generation += 1
        io = node.io = HostFiles(
            node.storage / "replicas", self.root / f"nsnap-{node.index}-{node.generation}"
        )
        store = node.store = NodeStore(self._store(), node.name, self.fenced)
        agent = node.agent = ClusterNode(
            self._config(node),
            ssl_context=_server_context_for(self.certs, node.name),
            rng=random.Random(f"{self.seed}:node:{node.index}:{node.generation}"),
            store=store,
            file_io=lambda _storage: io,
        )
        scope = node.scope = trio.CancelScope()
        done = node.done = trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope, network.using(self.net.host(node.address)):
                    await agent.run(task_status=task_status)
            except BaseException:
                if not io.dead:
                    raise
            finally:
                done.set()

        await nursery.start(run)

    async def kill_node(self, node: SimNode, *, power_loss: bool, rng: random.Random) -> str:
        assert node.io is not None
        assert node.scope is not None
        assert node.done is not None
        io = node.io
        point = min(len(io.ops), io.trip_at) if io.trip_at >= 0 else len(io.ops)
        io.dead = True
        self.net.isolate(node.address)
        if self._holds_cap(node):
            self.net.isolate(CAP_ADDRESS)
        node.scope.cancel()
        await node.done.wait()
        if node.agent is not None and node.agent._server is not None:
            node.agent._server.close()
        if node.store is not None:
            with trio.CancelScope(shield=True):
                await node.store.aclose()
        node.agent = node.store = node.io = None
        if not power_loss:
            return "page cache kept"
        scratch = self.root / f"ncrashed-{node.index}-{node.generation}"
        return power_cut(io, point, rng, node.storage / "replicas", scratch)

    def _holds_cap(self, node: SimNode) -> bool:
        return node.agent is not None and node.agent.broker is not None

    async def records(self) -> dict[uuid.UUID, VMRecord]:
        store = self._store()
        try:
            kvs, _ = await store.range(self.keys.vms)
        finally:
            await store.aclose()
        return {
            uuid.UUID(kv.key.removeprefix(self.keys.vms)): VMRecord.from_json(kv.value)
            for kv in kvs
        }

    def observe_owners(self, records: dict[uuid.UUID, VMRecord]) -> None:
        """Note each VM's acknowledged sequence against the node its record names."""
        by_name = {n.name: n for n in self.nodes}
        for vm in self.vms:
            vm.observe()
            record = records.get(vm.vmid)
            if record is not None and record.owner in by_name and vm.acked >= 0:
                node = by_name[record.owner]
                node.acked[vm.vmid] = max(node.acked.get(vm.vmid, -1), vm.acked)


def _server_context_for(certs: Path, name: str) -> ssl.SSLContext:
    return server_context(certs / f"{name}.pem", certs / f"{name}-key.pem", certs / "ca.pem")


async def check_node(world: ClusterWorld, node: SimNode) -> list[str]:
    """#5 on a node just restarted: what it acknowledged while it owned a VM is there;
    #6 and #8 on those replicas."""
    failures = []
    records = await world.records()
    store = ReplicaStore(node.storage / "replicas")
    try:
        for vmid, acked in node.acked.items():
            record = records.get(vmid)
            if record is None or record.owner != node.name:
                continue  # moved on (a migration, a re-homing): not this node's any more
            vm = next(v for v in world.vms if v.vmid == vmid)
            name = vm.name
            if not store.exists(vmid):
                failures.append(f"#5 {name}: gone from {node.name}, {acked} was acknowledged")
                continue
            replica = store.open(vmid)
            if replica.applied_sequence < acked:
                failures.append(
                    f"#5 {name}: {node.name} at {replica.applied_sequence}, "
                    f"{acked} was acknowledged"
                )
            if vmid not in world.failed_over:
                failures += check_points(vm, replica, world.digests)
    finally:
        store.close()
    return failures


async def check_cluster(world: ClusterWorld) -> list[str]:
    """#1, #3, #4, #6 and #8 once quiet (the primaries stopped, every node running)."""
    failures = []
    records = await world.records()
    by_name = {n.name: n for n in world.nodes}
    for vm in world.vms:
        r = vm.replicator
        if vm.vmid in world.failed_over:
            # #7: once failed over, its former primary writes to it no more (#1 and #4 do
            # not apply: it runs from its replica, its primary is told to stop).
            vm.observe()
            if vm.acked > world.failed_over[vm.vmid]:
                failures.append(
                    f"#7 {vm.name}: acknowledged {vm.acked} after its failover "
                    f"(at {world.failed_over[vm.vmid]})"
                )
            continue
        if r is not None and r.state.halted is not None:
            failures.append(f"#4 {vm.name}: halted: {r.state.halted}")
        holders = []
        for node in world.nodes:
            agent = node.agent
            if agent is not None and agent._server is not None:
                await agent._server.settle(vm.vmid)
            if (node.storage / "replicas" / str(vm.vmid)).is_dir():
                holders.append(node)
        record = records.get(vm.vmid)
        if record is None:
            failures.append(f"#3 {vm.name}: no record in the cluster once quiet")
            continue
        if len(holders) > 1:
            failures.append(f"#3 {vm.name}: held by {[n.name for n in holders]}")
        owner = by_name.get(record.owner)
        if owner is None or owner not in holders:
            failures.append(
                f"#3 {vm.name}: its record names {record.owner}, which does not hold it"
            )
            continue
        store = ReplicaStore(owner.storage / "replicas")
        try:
            replica = store.open(vm.vmid)
            if replica.ir_state != fp.IRState.COMPLETE:
                failures.append(f"#1 {vm.name}: IR {replica.ir_state.name} on {owner.name}")
                continue
            for disk, path in enumerate(vm.images):
                size = path.stat().st_size
                if replica.read(disk, 0, size) != path.read_bytes():
                    failures.append(f"#1 {vm.name}: disk {disk} on {owner.name} differs")
            failures += check_points(vm, replica, world.digests)
        finally:
            store.close()
    return failures


__all__ = ["ClusterWorld", "SimNode", "check_cluster", "check_node"]


#: Cluster fault kinds, in the order of the summary table.
CLUSTER_KINDS = (
    "failover",
    "migrate",
    "drain",
    "settings",
    "node_kill",
    "node_power_loss",
    "store_partition",
    "primary_restart",
    "link_cut",
    "link_slow",
    "node_disk_full",
)
#: The kinds drawn from the schedule's first generator (a slowed link and a full disk
#: come from one of their own: the seeds drawn before them keep their faults).
_DRAWN = CLUSTER_KINDS[:-2]
#: The delay of every send on a slowed link.
SLOW_SECONDS = 0.05
FAULT_WINDOW = 150.0
QUIET = 200.0


async def run_cluster(
    world: ClusterWorld, result: Any, faults: list[Fault], rng: random.Random
) -> None:
    """The cluster run: start everything, apply ``faults``, then check once quiet."""
    event = world.trace

    def fail(found: list[str]) -> None:
        for line in found:
            event(f"INVARIANT {line}")
        result.failures += found

    await world.set_settings()
    event(f"cluster nodes={len(world.nodes)} primaries={len(world.primaries)} vms={len(world.vms)}")
    async with trio.open_nursery() as nursery:
        for node in world.nodes:
            await world.start_node(nursery, node)
        for primary in world.primaries:
            await world.start_primary(nursery, primary)
        for vm in world.vms:
            nursery.start_soon(world.write_disks, vm, FAULT_WINDOW)

        async def ticks() -> None:
            while True:
                await trio.sleep(10.0)
                records = await world.records()
                world.observe_owners(records)
                brokers = [n.name for n in world.nodes if world._holds_cap(n)]
                owners = " ".join(
                    f"{vm.name}@{records[vm.vmid].owner if vm.vmid in records else '-'}/{vm.acked}"
                    for vm in world.vms
                )
                event(f"tick broker={','.join(brokers) or '-'} {owners}")

        nursery.start_soon(ticks)
        busy: set[str] = set()

        def target_node(fault: Fault) -> SimNode:
            if fault.target < 0:  # the broker's node, if any
                for node in world.nodes:
                    if world._holds_cap(node):
                        return node
            return world.nodes[fault.target % len(world.nodes)]

        async def store_fault(fault: Fault, key: str) -> None:
            node = target_node(fault)
            try:
                if node.store is None:
                    event(f"store partition of {node.name} skipped: it is down")
                    return
                store = node.store
                store.cut = True
                was_broker = world._holds_cap(node)
                event(f"{node.name} cut off from the store{' (the broker)' if was_broker else ''}")
                await trio.sleep(fault.length)
                store.cut = False
                event(f"{node.name} reaches the store again")
            finally:
                busy.discard(key)

        async def admin_fault(fault: Fault, key: str) -> None:
            """What an administrator does (``frctl cluster ...``): migrate a VM, drain a
            node for a while, change a setting."""
            store = world._store()
            try:
                if fault.kind == "migrate":
                    records = await world.records()
                    vm = world.vms[fault.target % len(world.vms)]
                    record = records.get(vm.vmid)
                    others = [n for n in world.nodes if record is None or n.name != record.owner]
                    node = others[fault.target % len(others)]
                    await admin.request_migration(store, world.keys, vm.vmid, node.name)
                    event(f"migration of {vm.name} to {node.name} requested")
                elif fault.kind == "drain":
                    node = target_node(fault)
                    await admin.set_draining(store, world.keys, node.name, True)
                    event(f"{node.name} draining")
                    await trio.sleep(fault.length)
                    await admin.set_draining(store, world.keys, node.name, False)
                    event(f"{node.name} no longer draining")
                elif fault.kind == "failover":
                    vm = world.vms[fault.target % len(world.vms)]
                    await admin.request_failover(store, world.keys, vm.vmid)
                    event(f"failover of {vm.name} requested")
                    done = await admin.await_failover(store, world.keys, vm.vmid, timeout=60.0)
                    world.observe_owners(await world.records())
                    event(f"failover of {vm.name}: {done.failover} ({done.failover_note})")
                    if done.failover is FailoverState.DONE:
                        world.failed_over[vm.vmid] = vm.acked
                else:
                    points = 2 + fault.target % 3
                    await admin.update_settings(store, world.keys, {"recovery_points": points})
                    event(f"setting recovery_points = {points}")
            except (admin.AdminError, StoreError) as exc:
                event(f"{fault.kind} refused: {exc}")
            finally:
                await store.aclose()
                busy.discard(key)

        async def node_fault(fault: Fault, key: str) -> None:
            try:
                node = target_node(fault)
                if node.agent is None:
                    event(f"{fault.kind} of {node.name} skipped: it is down")
                    return
                world.observe_owners(await world.records())
                was_broker = world._holds_cap(node)
                what = await world.kill_node(
                    node, power_loss=fault.kind == "node_power_loss", rng=rng
                )
                event(f"node {node.name} killed{' (the broker)' if was_broker else ''} ({what})")
                await trio.sleep(fault.length)
                await world.start_node(nursery, node)
                event(f"node {node.name} started")
                fail(await check_node(world, node))
            finally:
                busy.discard(key)

        async def primary_fault(fault: Fault, key: str) -> None:
            try:
                primary = world.primaries[fault.target % len(world.primaries)]
                world.observe_owners(await world.records())
                what = await world.kill_primary(primary, power_loss=False, rng=rng)
                event(f"primary p{primary.index + 1} killed ({what})")
                await trio.sleep(fault.length)
                await world.start_primary(nursery, primary)
                event(f"primary p{primary.index + 1} started")
            finally:
                busy.discard(key)

        async def link_fault(fault: Fault, key: str) -> None:
            try:
                primary = world.primaries[fault.target % len(world.primaries)]
                node = world.nodes[fault.target % len(world.nodes)]
                if fault.kind == "link_cut":
                    world.net.cut(primary.address, node.address)
                    event(f"link p{primary.index + 1}-{node.name} cut")
                else:
                    world.net.slow(primary.address, node.address, SLOW_SECONDS)
                    event(f"link p{primary.index + 1}-{node.name} slowed")
                await trio.sleep(fault.length)
                world.net.heal(primary.address, node.address)
            finally:
                busy.discard(key)

        async def disk_full(fault: Fault, key: str) -> None:
            try:
                node = target_node(fault)
                io = node.io
                if io is None:
                    event(f"disk full of {node.name} skipped: it is down")
                    return
                io.full = True
                await trio.sleep(fault.length)
                io.full = False  # a restart meanwhile made another layer, with room
                event(f"{node.name} disk has room again")
            finally:
                busy.discard(key)

        async with trio.open_nursery() as faulting:
            for fault in faults:
                await trio.sleep_until(fault.at)
                group = fault.kind.split("_")[0]
                if fault.kind == "node_disk_full":
                    key = f"disk:{target_node(fault).name}"
                elif group in ("node", "store", "drain"):
                    key = f"node:{target_node(fault).name}"  # one fault per node at a time
                elif group == "primary":
                    key = f"primary:{fault.target % len(world.primaries)}"
                elif group == "link":
                    key = f"link:{fault.target % len(world.primaries)}"
                    key += f"-{fault.target % len(world.nodes)}"
                else:
                    key = "admin"  # one administrator, one command at a time
                if key in busy:
                    event(f"fault skipped (already under a fault): {fault.describe()}")
                    continue
                busy.add(key)
                result.faults[fault.kind] += 1
                event(f"fault {fault.describe()}")
                runner = {
                    "failover": admin_fault,
                    "migrate": admin_fault,
                    "drain": admin_fault,
                    "settings": admin_fault,
                    "node": node_fault,
                    "store": store_fault,
                    "primary": primary_fault,
                    "link": link_fault,
                }
                run = disk_full if fault.kind == "node_disk_full" else runner[group]
                faulting.start_soon(run, fault, key)
            await trio.sleep_until(FAULT_WINDOW)
            world.net.heal_all()
        event("faults over: quiet from now on")
        await trio.sleep(QUIET)
        world.observe_owners(await world.records())
        for primary in world.primaries:
            if primary.scope is not None:
                primary.scope.cancel()
        await trio.lowlevel.checkpoint()
        fail(world.fenced.violations())
        fail(await check_cluster(world))
        result.simulated_seconds = trio.current_time()
        event(f"end: {len(result.failures)} invariant failures")
        nursery.cancel_scope.cancel()


def draw_cluster_schedule(seed: int, nodes: int, primaries: int) -> list[Fault]:
    rng = random.Random(f"{seed}:cluster-faults")
    faults = []
    for _ in range(rng.randint(2, 7)):
        kind = rng.choice(_DRAWN)
        at = round(rng.uniform(10.0, FAULT_WINDOW - 20.0), 3)
        length = round(rng.uniform(1.0, 30.0), 3)
        target = rng.randrange(max(nodes, primaries))
        if (
            kind in ("node_kill", "node_power_loss", "store_partition", "drain")
            and rng.random() < 0.5
        ):
            target = -1  # the broker's node
        faults.append(Fault(at, kind, target, length))
    extra = random.Random(f"{seed}:cluster-slow-full")
    for _ in range(extra.choice([0, 1, 1, 2])):
        kind = extra.choice(["link_slow", "node_disk_full"])
        at = round(extra.uniform(10.0, FAULT_WINDOW - 20.0), 3)
        length = round(extra.uniform(1.0, 30.0), 3)
        target = extra.randrange(max(nodes, primaries))
        if kind == "node_disk_full" and extra.random() < 0.5:
            target = -1  # the broker's node
        faults.append(Fault(at, kind, target, length))
    faults.sort(key=lambda f: (f.at, f.kind, f.target))
    return faults

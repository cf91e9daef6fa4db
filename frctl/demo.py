"""The demo: an embedded recovery cluster on loopback, and a primary replicating to it.

Everything is real: three ``frctl node run`` processes (127.0.0.11-13) share a SQLite
cluster store (the embedded default) and elect a broker, which takes the CAP's own
address (127.0.0.10); mutual TLS with certificates made for the run; a primary (this
process, 127.0.0.3) replicates three VMs whose disks change between cycles. The demo

1. starts the nodes and waits for the broker's election;
2. sets the cluster's settings once (authorization of the primary, placement policy);
3. enables the VMs: the primary finds a broker at the CAP, the broker places each VM on a
   node (round-robin), the primary runs the initial replication there;
4. runs delta cycles, with writes in between;
5. migrates one replica to another node; the primary gets "VM not here", asks the
   broker again and carries on at the new node;
6. kills the broker's node with SIGKILL: another node takes the election and the CAP,
   the dead node's replicas are re-homed (the nodes share their storage here), and the
   primaries carry on;
7. checks every replica against its primary disk, block for block.

It prints what happens in readable lines and ends with ``demo OK`` (exit 0) or
``demo FAILED`` (exit 1). It takes about 15-30 s and leaves nothing behind.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import trio

import frproto as fp
from broker.admin import request_migration
from broker.records import VMRecord
from broker.store import open_store
from frtesting.cluster import ClusterSite, NodeProcess, primary_replicator, replica_path
from node.primary.replicator import VMReplicator

MIB = 1 << 20
VM_NAMES = ("web01", "db01", "mail01")


class _Out:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.start = time.monotonic()

    def __call__(self, text: str) -> None:
        if self.verbose:
            print(f"[{time.monotonic() - self.start:6.2f}s] {text}", flush=True)


def _make_disk(path: Path, rng: random.Random) -> Path:
    data = bytearray(rng.randbytes(8 * MIB))
    data[2 * MIB : 4 * MIB] = bytes(2 * MIB)  # never written: the replica stays sparse
    path.write_bytes(data)
    return path


def _write(path: Path, rng: random.Random) -> int:
    """A few writes, as a running VM makes; returns the bytes written."""
    total = 0
    with path.open("r+b") as f:
        for _ in range(rng.randint(2, 6)):
            size = rng.choice([4096, 65536, 262144])
            f.seek(rng.randrange(0, 8 * MIB - size))
            f.write(rng.randbytes(size))
            total += size
    return total


async def _owner(site: ClusterSite, vmid: str) -> str:
    async with open_store(site.store_url) as store:
        kv = await store.get(site.keys.vm(vmid))
    return "" if kv is None else VMRecord.from_json(kv.value).owner


async def _cycle(vm: VMReplicator, out: _Out, *, timeout: float = 30.0) -> None:
    """One cycle; retried while a moving replica makes it wait (BUSY, VM_NOT_HERE)."""
    before = vm.state.node_name
    with trio.fail_after(timeout):
        while True:
            try:
                await vm.cycle()
                break
            except (fp.Busy, fp.VMNotHere, OSError) as exc:
                out(f"  {vm.state.name}: {type(exc).__name__}: {exc}; retrying")
                await trio.sleep(0.3)
    after = vm.state.node_name
    if before and after != before:
        out(f"  {vm.state.name}: followed its replica {before} -> {after} (asked the broker)")


async def _replicate_all(
    vms: list[VMReplicator], disks: list[Path], rng: random.Random, out: _Out
) -> None:
    for vm, disk in zip(vms, disks, strict=True):
        written = _write(disk, rng)
        seq = vm.state.sequence
        await _cycle(vm, out)
        out(
            f"  {vm.state.name}: {written // 1024} KiB written, batch {vm.state.sequence} "
            f"applied at {vm.state.node_name}" + ("" if vm.state.sequence > seq else " (no change)")
        )


def _same(site: ClusterSite, node: str, vmid: str, disk: Path) -> bool:
    index = int(node.split(".", maxsplit=1)[0][1:])
    replica = replica_path(site, index, uuid.UUID(vmid))
    return replica.exists() and replica.read_bytes() == disk.read_bytes()


async def _migrate(site: ClusterSite, vmid: str, target: str) -> None:
    async with open_store(site.store_url) as store:
        await request_migration(store, site.keys, vmid, target)


def _move_one(vms: list[VMReplicator], site: ClusterSite, out: _Out) -> bool:
    """Move a replica onto the broker's node, so that killing that node strands it."""
    broker = site.broker_node()
    moving = next(vm for vm in vms if vm.state.node_name != broker.name)
    source, target = moving.state.node_name, broker.name
    out(f"migrating {moving.state.name}'s replica {source} -> {target}:")
    out(f"  broker.admin.request_migration({moving.state.vmid}, {target})")
    trio.run(_migrate, site, moving.state.vmid, target)
    deadline = time.monotonic() + 20
    while trio.run(_owner, site, moving.state.vmid) != target:
        if time.monotonic() > deadline:
            out("  the replica did not move")
            return False
        time.sleep(0.1)
    out(f"  {target} owns it now (shared storage: an ownership change)")
    return True


def _kill_broker(
    vms: list[VMReplicator], site: ClusterSite, out: _Out
) -> tuple[NodeProcess, NodeProcess]:
    """SIGKILL the broker's node; report the new broker and where its replicas went.
    Returns the killed node and the new broker's."""
    broker = site.broker_node()
    out(f"killing the broker's node {broker.name} with SIGKILL")
    broker.kill()
    killed = time.monotonic()
    survivor = site.broker_node(timeout=15)
    out(f"  {survivor.name} took the election and the CAP {time.monotonic() - killed:.2f} s later")
    for vm in vms:
        if vm.state.node_name == broker.name:
            now = ""
            while now in ("", broker.name) and time.monotonic() < killed + 20:
                now = trio.run(_owner, site, vm.state.vmid)
                time.sleep(0.05)
            out(f"  {vm.state.name}: its replica was on {broker.name}: re-homed to {now}")
    return broker, survivor


def _all_equal(vms: list[VMReplicator], disks: list[Path], site: ClusterSite, out: _Out) -> bool:
    ok = True
    for vm, disk in zip(vms, disks, strict=True):
        owner = trio.run(_owner, site, vm.state.vmid)
        same = _same(site, owner, vm.state.vmid, disk)
        ok = ok and same and owner == vm.state.node_name
        out(
            f"{vm.state.name}: replica on {owner} at batch {vm.state.sequence}: "
            + (
                "equals the primary disk, block for block"
                if same
                else "DIFFERS from the primary disk"
            )
        )
    return ok


def _run(site: ClusterSite, out: _Out) -> bool:
    rng = random.Random(2026)
    out(f"starting {site.nodes} recovery nodes (frctl node run) on 127.0.0.11-{10 + site.nodes}")
    out(f"  cluster store: {site.store_url} (SQLite, WAL: the embedded default)")
    site.start_all()
    broker = site.broker_node()
    out(f"  broker elected: {broker.name}, serving the CAP cap.example.com at 127.0.0.10")
    site.authorize_primary(placement_policy="round-robin", recovery_points=8)
    out("settings set once: authorize *.primary.example.com, round-robin placement, 8 points")

    disks = [_make_disk(site.root / f"{name}.img", rng) for name in VM_NAMES]
    vms: list[VMReplicator] = []
    for name, disk in zip(VM_NAMES, disks, strict=True):
        vm = primary_replicator(site, uuid.uuid4(), [disk])
        vm.state.name = name
        vm.store.save(vm.state)
        vms.append(vm)

    async def enable() -> None:
        for vm in vms:
            started = time.monotonic()
            await _cycle(vm, out)
            out(
                f"{vm.state.name}: the primary found a broker at the CAP; placed on "
                f"{vm.state.node_name}; initial replication of 8 MiB in "
                f"{time.monotonic() - started:.2f} s"
            )

    trio.run(enable)
    out("delta cycles, with writes in between:")
    trio.run(_replicate_all, vms, disks, rng, out)
    if not _move_one(vms, site, out):
        return False
    trio.run(_replicate_all, vms, disks, rng, out)
    killed, survivor = _kill_broker(vms, site, out)
    trio.run(_replicate_all, vms, disks, rng, out)
    site.start(killed.index)
    out(f"{killed.name} restarted: it rejoins as a node; the broker stays on {survivor.name}")
    trio.run(_replicate_all, vms, disks, rng, out)
    return _all_equal(vms, disks, site, out)


def run_demo(*, verbose: bool = True) -> int:
    """Run the demo; returns 0 when every replica ends equal to its disk."""
    out = _Out(verbose)
    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="frrep-demo-"))
    site = ClusterSite(root, nodes=3, shared_storage=True)
    try:
        ok = _run(site, out)
    except Exception as exc:  # report, then clean up; the exit code says it failed
        print(f"demo error: {type(exc).__name__}: {exc}")
        ok = False
    finally:
        site.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1

"""Replicas that move while their primary replicates: migration (shared and local
storage) and re-homing after a node dies. Real node processes, a real primary."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from broker.records import VMRecord
from broker.store import open_store
from frctl.main import main as frctl
from node.primary.replicator import ReplicationHalted
from tests.broker.cluster_site import (
    ClusterSite,
    node_name,
    primary_replicator,
    replica_path,
)

MIB = 1 << 20


def make_image(path: Path, rng: random.Random, size: int = 2 * MIB) -> Path:
    data = bytearray(rng.randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 4)  # a hole: the replica stays sparse
    path.write_bytes(data)
    return path


def scribble(path: Path, rng: random.Random) -> None:
    with path.open("r+b") as f:
        for _ in range(4):
            f.seek(rng.randrange(0, path.stat().st_size - 70000))
            f.write(rng.randbytes(rng.choice([4096, 65536])))


async def read_owner(site: ClusterSite, vmid: uuid.UUID) -> VMRecord:
    async with open_store(site.store_url) as store:
        kv = await store.get(site.keys.vm(vmid))
    assert kv is not None
    return VMRecord.from_json(kv.value)


def owner(site: ClusterSite, vmid: uuid.UUID) -> VMRecord:
    return trio.run(read_owner, site, vmid)


def index(name: str) -> int:
    return int(name.split(".", maxsplit=1)[0][1:])


async def cycle_until_done(replicator: Any, *, timeout: float = 30.0) -> None:
    """One successful cycle, retrying what a moving replica makes retryable (BUSY while
    the owner holds the VM for the switch, VM_NOT_HERE past the re-query limit)."""
    with trio.fail_after(timeout):
        while True:
            try:
                await replicator.cycle()
                return
            except ReplicationHalted:
                raise
            except (fp.Busy, fp.VMNotHere, OSError, trio.BrokenResourceError) as exc:
                # A connection cut by a node or a broker that died mid-answer is
                # retryable too: the primary's service retries every failed cycle.
                print(f"cycle retried: {type(exc).__name__}: {exc}")
                await trio.sleep(0.2)


@pytest.fixture(params=["local", "shared"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterSite]:
    site = ClusterSite(tmp_path, nodes=3, shared_storage=request.param == "shared")
    try:
        site.start_all()
        site.authorize_primary(placement_policy="round-robin")
        yield site
    finally:
        site.stop_all()


def test_a_migrated_replica_is_followed_and_nothing_is_lost(cluster: ClusterSite) -> None:
    rng = random.Random(7)
    vmid = uuid.uuid4()
    image = make_image(cluster.root / "disk0.img", rng)
    replicator: Any = primary_replicator(cluster, vmid, [image])
    trio.run(cycle_until_done, replicator)
    first = owner(cluster, vmid).owner
    assert replica_path(cluster, index(first), vmid).read_bytes() == image.read_bytes()
    target = next(node_name(i) for i in (1, 2, 3) if node_name(i) != first)
    where = ["--store", cluster.store_url, "--prefix", cluster.prefix]

    async def replicate_while_moving() -> None:
        # The primary keeps replicating, with writes between cycles, while the owner
        # moves the replica; the move happens between two of its cycles.
        moved = False
        for n in range(12):
            scribble(image, rng)
            await cycle_until_done(replicator)
            if n == 2:
                args = ["cluster", "migrate", *where, str(vmid), target]
                assert await trio.to_thread.run_sync(frctl, args) == 0
            if not moved and (await read_owner(cluster, vmid)).owner == target:
                moved = True
            await trio.sleep(0.1)
        assert moved, "the replica was not moved"

    trio.run(replicate_while_moving)
    assert owner(cluster, vmid).owner == target
    assert replicator.state.node_name == target
    # Every acknowledged write is at the new owner: the replica equals the disk.
    assert replica_path(cluster, index(target), vmid).read_bytes() == image.read_bytes()
    if not cluster.shared_storage:
        assert not replica_path(cluster, index(first), vmid).exists()  # the copy moved
    log = "".join(n.text() for n in cluster.running.values())
    assert f"moved {first} -> {target}" in log


def test_a_dead_nodes_shared_replicas_are_rehomed_and_followed(tmp_path: Path) -> None:
    site = ClusterSite(tmp_path, nodes=3, shared_storage=True)
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(8)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        replicator: Any = primary_replicator(site, vmid, [image])
        trio.run(cycle_until_done, replicator)
        first = owner(site, vmid).owner
        victim = site.running[index(first)]
        victim.kill()
        killed = time.monotonic()
        deadline = killed + 15
        while owner(site, vmid).owner == first:
            assert time.monotonic() < deadline, "the replica was not re-homed"
            time.sleep(0.1)
        print(
            f"re-homed {first} -> {owner(site, vmid).owner}: "
            f"{time.monotonic() - killed:.2f} s after kill -9"
        )
        scribble(image, rng)
        trio.run(cycle_until_done, replicator)
        new = owner(site, vmid).owner
        assert replicator.state.node_name == new != first
        assert replica_path(site, index(new), vmid).read_bytes() == image.read_bytes()
    finally:
        site.stop_all()


def test_out_of_band_ir_is_completed_by_the_vms_node(tmp_path: Path) -> None:
    from node.primary.oob_export import export_ir, is_exported

    site = ClusterSite(tmp_path, nodes=3)
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(9)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        replicator: Any = primary_replicator(site, vmid, [image])
        export = site.root / "vm.frrepir"
        export_ir(replicator.state, replicator.store.root, export)
        assert is_exported(replicator.dir)

        async def first_contact() -> None:
            # The broker places the VM; the node creates the relationship; the primary
            # sends no IR data and waits for the import.
            with pytest.raises(fp.Busy, match="out-of-band"):
                await replicator.cycle()

        trio.run(first_contact)
        placed = owner(site, vmid).owner
        other = next(i for i in (1, 2, 3) if node_name(i) != placed)
        # Imported from another node's host: the cluster finds the owner.
        args = ["cluster", "import", "--config", str(site.config_path(other)), str(export)]
        assert frctl(args) == 0
        assert replica_path(site, index(placed), vmid).read_bytes() == image.read_bytes()
        scribble(image, rng)
        trio.run(cycle_until_done, replicator)  # finds the IR complete (imported)
        assert replicator.state.ir_state == "COMPLETE"
        trio.run(cycle_until_done, replicator)  # then deltas: the writes since the export
        assert replica_path(site, index(placed), vmid).read_bytes() == image.read_bytes()
        assert frctl(args) == 1  # a second import is refused: the IR is complete
    finally:
        site.stop_all()


def test_draining_a_node_moves_its_replicas_away_and_places_nothing_on_it(
    tmp_path: Path,
) -> None:
    site = ClusterSite(tmp_path, nodes=3)
    try:
        site.start_all()
        site.authorize_primary(placement_policy="round-robin")
        rng = random.Random(11)
        vms = []
        for n in range(3):  # round-robin: one VM on each node
            image = make_image(site.root / f"disk{n}.img", rng)
            replicator: Any = primary_replicator(site, uuid.uuid4(), [image])
            trio.run(cycle_until_done, replicator)
            vms.append((replicator, image))
        drained = node_name(2)
        where = ["--store", site.store_url, "--prefix", site.prefix]
        assert frctl(["cluster", "drain", *where, drained]) == 0
        deadline = time.monotonic() + 30
        while any(owner(site, uuid.UUID(r.state.vmid)).owner == drained for r, _ in vms):
            assert time.monotonic() < deadline, "the drained node kept its replica"
            time.sleep(0.2)
        for replicator, image in vms:
            scribble(image, rng)
            trio.run(cycle_until_done, replicator)
            vmid = uuid.UUID(replicator.state.vmid)
            now = owner(site, vmid).owner
            assert now != drained
            assert replica_path(site, index(now), vmid).read_bytes() == image.read_bytes()

        async def place_more() -> list[str]:
            return [(await site.query(uuid.uuid4())).server_name for _ in range(6)]

        assert drained not in trio.run(place_more)
        assert frctl(["cluster", "drain", *where, "--undo", drained]) == 0
    finally:
        site.stop_all()

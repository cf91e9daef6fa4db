"""QEMU as the change source, end to end: a real ``qemu-storage-daemon`` serving a qcow2
and a raw disk, a guest writing through QEMU while cycles run, and a real recovery server
(docs/qemu.md)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from frtesting.qemu import BackgroundWriter, Disk, QemuDaemon, create_image, missing_qemu
from frtesting.server import ServerProcess
from node.primary.qemu import PointInTime, QemuSource
from node.primary.replicator import VMReplicator
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site

MIB = 1024 * 1024
SIZE = 8 * MIB


@pytest.fixture(autouse=True)
def _qemu_installed() -> None:
    """These tests need QEMU and libnbd; under CI=true their absence fails, naming them."""
    missing = missing_qemu()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {missing}")
        pytest.skip(missing)


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


@pytest.fixture
def daemon(site: Site) -> Iterator[QemuDaemon]:
    disks = [
        Disk("disk0", create_image(site.root / "vm-disk0.qcow2", SIZE, "qcow2"), "qcow2"),
        Disk("disk1", create_image(site.root / "vm-disk1.raw", SIZE - 3 * 65536, "raw"), "raw"),
    ]
    qsd = QemuDaemon(site.root / "qemu", disks).start()
    yield qsd
    qsd.kill()


class Recording(QemuSource):
    """Keeps a copy of every point in time it opens, read whole at once (the check)."""

    points: list[list[bytes]]

    def open_point(self, *, expect_bitmaps: bool) -> PointInTime:
        point = super().open_point(expect_bitmaps=expect_bitmaps)
        self.points.append([v.pread(v.size, 0) for v in point.views])
        return point


def qemu_replicator(
    site: Site, daemon: QemuDaemon, port: int, vmid: uuid.UUID, **options: Any
) -> VMReplicator:
    """A replicator of the daemon's VM, as ``frctl replication enable --qemu-qmp`` makes."""
    store = PrimaryStateStore(site.state_dir)
    sizes = QemuSource(daemon.qmp_socket, [d.node for d in daemon.disks], site.root).disk_sizes()
    state = VMReplicationState(
        vmid=str(vmid),
        name="qemu-vm",
        disks=[
            {"disk_id": d.node, "path": str(d.image), "size": size, "qemu_node": d.node}
            for d, size in zip(daemon.disks, sizes, strict=True)
        ],
        recovery_host=SERVER_HOST,
        recovery_port=port,
        server_name=SERVER_NAME,
        frequency_s=1.0,
        qemu={"qmp": daemon.qmp_socket, "nbd": daemon.nbd_socket},
    )
    store.save(state)
    return VMReplicator(state, store, site.client_context(), local_address=PRIMARY_HOST, **options)


def recording(replicator: VMReplicator) -> Recording:
    source = replicator.qemu
    assert source is not None
    rec = Recording(source.qmp_socket, source.nodes, source.work_dir, source.nbd_socket)
    rec.points = []
    replicator.qemu = rec
    return rec


def replica(site: Site, vmid: uuid.UUID, disk: str) -> bytes:
    from node.storage.layout import ReplicaLayout

    return ReplicaLayout(site.storage, vmid).image(disk).read_bytes()


def frrep_objects(daemon: QemuDaemon) -> dict[str, list[str]]:
    """What of frrep's is in QEMU: exports, jobs, fleecing nodes, bitmaps per disk."""
    nodes = daemon.qmp("query-named-block-nodes", {"flat": True})
    return {
        "exports": [e["id"] for e in daemon.qmp("query-block-exports") if "frrep" in e["id"]],
        "jobs": [j["device"] for j in daemon.qmp("query-block-jobs")],
        "nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("frrep")],
        **{
            n["node-name"]: sorted(
                f"{b['name']}:{'rec' if b['recording'] else 'frozen'}"
                for b in n.get("dirty-bitmaps", [])
                if b.get("name", "").startswith("frrep-")
            )
            for n in nodes
            if n["node-name"] in ("disk0", "disk1")
        },
    }


def assert_clean(daemon: QemuDaemon) -> None:
    """Between cycles: no export, job or fleecing node; one recording bitmap per disk."""
    found = frrep_objects(daemon)
    assert found["exports"] == found["jobs"] == found["nodes"] == [], found
    for disk in ("disk0", "disk1"):
        assert len(found[disk]) == 1, found
        assert found[disk][0].endswith(":rec"), found


async def test_guest_writing_during_cycles_replica_is_each_point_in_time(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """A qcow2 and a raw disk, the guest writing at random places all along; after every
    acknowledged cycle the replica is, byte for byte, the point in time it read."""
    rng = random.Random(17)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    writers = [daemon.writer(d.node) for d in daemon.disks]
    for w in writers:
        w.random_writes(rng, 20)
    replicator = qemu_replicator(site, daemon, server.port, vmid)
    rec = recording(replicator)
    with trio.fail_after(90), BackgroundWriter(writers, seed=3) as guest:
        for cycle in range(10):
            await replicator.cycle()
            assert replicator.state.ir_state == IRStage.COMPLETE
            assert replicator.state.sequence == cycle
            point = rec.points[-1]
            for index, disk in enumerate(daemon.disks):
                assert replica(site, vmid, disk.node) == point[index], (cycle, disk.node)
            assert_clean(daemon)
            await trio.sleep(0.05)
        assert guest.writes > 20
    assert replicator.state.qemu_bitmap == "intact"
    # The guest's writes go on: what it wrote after a point is in the next one only.
    assert rec.points[-1] != rec.points[-2]
    for w in writers:
        w.close()

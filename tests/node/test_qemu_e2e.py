"""QEMU as the change source, end to end: a real ``qemu-storage-daemon`` serving a qcow2
and a raw disk, a guest writing through QEMU while cycles run, and a real recovery server
(docs/qemu.md)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from frtesting.qemu import (
    BackgroundWriter,
    Disk,
    GuestWriter,
    QemuDaemon,
    create_image,
    missing_qemu,
)
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
    #: Run once the point is taken, while the cycle goes on (the guest writing then).
    during: Any = None

    def open_point(self, *, expect_bitmaps: bool) -> PointInTime:
        point = super().open_point(expect_bitmaps=expect_bitmaps)
        self.points.append([v.pread(v.size, 0) for v in point.views])
        if self.during is not None:
            self.during()
        return point


def qemu_replicator(
    site: Site,
    daemon: QemuDaemon,
    port: int,
    vmid: uuid.UUID,
    *,
    own_nbd: bool = False,
    **options: Any,
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
        qemu={"qmp": daemon.qmp_socket, "nbd": None if own_nbd else daemon.nbd_socket},
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
    """The replica's image, once the server has applied the last acknowledged batch
    (it acknowledges first, then applies: the pipelined commit)."""
    from frtesting.replicas import applied_image

    return applied_image(site.storage, vmid, disk).read_bytes()


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


async def _replicated(
    site: Site, server: ServerProcess, daemon: QemuDaemon, seed: int
) -> tuple[uuid.UUID, VMReplicator, Recording, list[GuestWriter]]:
    """A VM past its IR and one cycle, with its guest writers."""
    rng = random.Random(seed)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    writers = [daemon.writer(d.node) for d in daemon.disks]
    for w in writers:
        w.random_writes(rng, 10)
    replicator = qemu_replicator(site, daemon, server.port, vmid)
    rec = recording(replicator)
    await replicator.cycle()
    for w in writers:
        w.random_writes(rng, 5)
    await replicator.cycle()
    return vmid, replicator, rec, writers


def assert_replica_is_last_point(site: Site, vmid: uuid.UUID, rec: Recording) -> None:
    for index, disk in enumerate(("disk0", "disk1")):
        assert replica(site, vmid, disk) == rec.points[-1][index], disk


def bitmap_counts(daemon: QemuDaemon) -> dict[str, int]:
    """Dirty bytes of frrep's recording bitmap, per disk."""
    return {
        n["node-name"]: sum(
            b["count"] for b in n.get("dirty-bitmaps", []) if b.get("name", "").startswith("frrep-")
        )
        for n in daemon.qmp("query-named-block-nodes", {"flat": True})
        if n["node-name"] in ("disk0", "disk1")
    }


async def test_a_failed_capture_merges_the_bitmap_back(
    site: Site, server: ServerProcess, daemon: QemuDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The capture fails after the point was taken (the pending log cannot be written):
    the frozen bitmap is merged back, nothing of QEMU's fleecing is left, and the next
    cycle replicates what the failed one would have."""
    vmid, replicator, rec, writers = await _replicated(site, server, daemon, 21)
    rng = random.Random(5)
    for w in writers:
        w.random_writes(rng, 8)
    before = bitmap_counts(daemon)
    assert all(before.values())

    def full(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(replicator.pending, "append_cycle", full)
        with pytest.raises(OSError, match="No space"):
            await replicator.cycle()
    assert_clean(daemon)
    after = bitmap_counts(daemon)
    for disk, count in before.items():
        assert after[disk] >= count, (disk, before, after)  # merged back, none lost
    # A cancelled cycle (the service stopping mid-cycle) merges back too.
    with trio.move_on_after(0.001):
        await replicator.cycle()
    assert_clean(daemon)
    sequence = replicator.state.sequence
    await replicator.cycle()
    assert replicator.state.sequence == sequence + 1
    assert_replica_is_last_point(site, vmid, rec)


async def test_a_bitmap_removed_behind_our_back_resyncs_by_digests(
    site: Site, server: ServerProcess, daemon: QemuDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone removes frrep's bitmap: the next cycle says it is lost, resynchronizes by
    digests (the writes made while nobody tracked reach the replica) and tracks again."""
    import logging

    caplog.set_level(logging.WARNING, logger="frrep.primary")
    vmid, replicator, rec, writers = await _replicated(site, server, daemon, 22)
    for n in daemon.qmp("query-named-block-nodes", {"flat": True}):
        for b in n.get("dirty-bitmaps", []):
            if n["node-name"] == "disk0" and b.get("name", "").startswith("frrep-"):
                daemon.qmp("block-dirty-bitmap-remove", {"node": "disk0", "name": b["name"]})
    writers[0].write(3 * MIB, b"untracked" * 1000)  # nobody tracks this write
    await replicator.cycle()
    assert replicator.last_resync is not None
    assert replicator.last_resync.method == "digests"
    said = [m for m in caplog.messages if "resynchronizing by digests" in m]
    assert said
    assert "disk0: bitmap missing" in said[0]
    assert replicator.state.qemu_bitmap == "intact"
    assert not replicator.state.needs_resync
    assert_replica_is_last_point(site, vmid, rec)
    assert b"untracked" in replica(site, vmid, "disk0")[3 * MIB : 3 * MIB + 20]
    assert_clean(daemon)
    writers[1].write(MIB, b"tracked again" * 100)
    await replicator.cycle()
    assert_replica_is_last_point(site, vmid, rec)


_OPEN_AND_HANG = """
import sys, time
from pathlib import Path
from node.primary.qemu import QemuSource
source = QemuSource(sys.argv[1], ["disk0", "disk1"], Path(sys.argv[2]), sys.argv[3])
point = source.open_point(expect_bitmaps=True)
print("open", flush=True)
time.sleep(60)
"""


async def test_a_primary_killed_mid_cycle_leaves_leftovers_the_next_start_cleans(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """kill -9 of a primary holding a point in time (fleecing jobs, exports, a frozen
    bitmap in QEMU): the next start removes it all, merges the frozen bitmap back, and
    replicates the writes of both intervals without a new IR."""
    import subprocess
    import sys

    from frtesting.server import child_env

    vmid, replicator, _rec, writers = await _replicated(site, server, daemon, 23)
    source = replicator.qemu
    assert source is not None
    writers[0].write(2 * MIB, b"before the kill" * 100)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _OPEN_AND_HANG,
            source.qmp_socket,
            str(source.work_dir),
            str(source.nbd_socket),
        ],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"open\n"
    child.kill()
    child.wait(10)
    left = frrep_objects(daemon)
    assert left["exports"]
    assert left["jobs"]
    assert left["nodes"]
    assert any(b.endswith(":frozen") for b in left["disk0"])
    writers[1].write(MIB, b"after the kill" * 100)
    restarted = site.restarted(replicator)
    rec2 = recording(restarted)
    await restarted.cycle()
    assert restarted.state.ir_state == IRStage.COMPLETE
    assert restarted.last_chunk_bytes_sent < SIZE // 4  # the changes, not a new IR
    assert_replica_is_last_point(site, vmid, rec2)
    assert b"before the kill" in replica(site, vmid, "disk0")[2 * MIB : 2 * MIB + 20]
    assert b"after the kill" in replica(site, vmid, "disk1")[MIB : MIB + 20]
    assert_clean(daemon)


async def test_qemu_killed_and_restarted_resyncs_by_digests(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """kill -9 of QEMU: the raw disk's bitmap is gone and the qcow2's is left in use
    (inconsistent); on restart the next cycle resynchronizes by digests, no new IR."""
    vmid, replicator, rec, writers = await _replicated(site, server, daemon, 24)
    writers[0].write(5 * MIB, b"last words" * 100)
    for w in writers:
        w.close()
    daemon.kill()
    with pytest.raises(Exception, match="cannot be reached"):
        await replicator.cycle()  # QEMU is down: the cycle fails and says why
    daemon.start()
    await replicator.cycle()
    assert replicator.last_resync is not None
    assert replicator.last_resync.method == "digests"
    assert replicator.last_chunk_bytes_sent < SIZE // 4
    assert_replica_is_last_point(site, vmid, rec)
    assert b"last words" in replica(site, vmid, "disk0")[5 * MIB : 5 * MIB + 20]
    assert replicator.state.qemu_bitmap == "intact"


async def test_a_qcow2_bitmap_survives_a_clean_qemu_restart(
    site: Site, server: ServerProcess
) -> None:
    """A qcow2's bitmap is persistent: QEMU stopped cleanly and started again, the next
    cycle captures from it (no resynchronization); frrep's own NBD server is used."""
    disks = [Disk("disk0", create_image(site.root / "solo.qcow2", SIZE, "qcow2"), "qcow2")]
    subprocess_write(disks[0].image, "qcow2", MIB, 0xAB)
    daemon = QemuDaemon(site.root / "qemu-solo", disks, guest_nbd=False).start()
    try:
        vmid = uuid.UUID(int=25, version=4)
        replicator = qemu_replicator(site, daemon, server.port, vmid, own_nbd=True)
        rec = recording(replicator)
        await replicator.cycle()
        assert replica(site, vmid, "disk0") == rec.points[-1][0]
        daemon.stop()
        subprocess_write(disks[0].image, "qcow2", 4 * MIB, 0xCD)  # QEMU down: tracked? no
        daemon.start()
        await replicator.cycle()
    finally:
        daemon.kill()
    assert replicator.last_resync is None  # the bitmap was there, intact
    assert replicator.state.qemu_bitmap == "intact"
    # qemu-io wrote with QEMU stopped, through the qcow2 itself: the persistent bitmap
    # recorded it (qemu-io is QEMU's block layer too), so the replica has it.
    assert replica(site, vmid, "disk0") == rec.points[-1][0]
    assert replica(site, vmid, "disk0")[4 * MIB] == 0xCD


def subprocess_write(image: Path, fmt: str, offset: int, pattern: int) -> None:
    """Write 64 KiB of ``pattern`` at ``offset`` with qemu-io (QEMU not running)."""
    import subprocess

    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} 64k", str(image)],
        check=True,
        capture_output=True,
        timeout=30,
    )


async def test_ir_reads_only_allocated_extents(site: Site, server: ServerProcess) -> None:
    """A mostly empty 64 MiB qcow2: the IR reads only its allocated extents from QEMU
    (base:allocation), and zero space travels as ZERO chunks."""
    image = create_image(site.root / "sparse.qcow2", 64 * MIB, "qcow2")
    for offset in (0, 20 * MIB, 40 * MIB + 65536):
        subprocess_write(image, "qcow2", offset, 0x5A)
    daemon = QemuDaemon(site.root / "qemu-sparse", [Disk("disk0", image, "qcow2")]).start()
    try:
        vmid = uuid.UUID(int=26, version=4)
        replicator = qemu_replicator(site, daemon, server.port, vmid)
        read: list[int] = []
        rec = recording(replicator)
        original = rec.open_point

        def counting(*, expect_bitmaps: bool) -> PointInTime:
            point = original(expect_bitmaps=expect_bitmaps)
            read.append(sum(v.bytes_read for v in point.views))
            reads.append(point)
            return point

        reads: list[PointInTime] = []
        rec.open_point = counting  # type: ignore[method-assign]
        await replicator.cycle()
    finally:
        daemon.kill()
    assert replicator.state.ir_state == IRStage.COMPLETE
    assert replica(site, vmid, "disk0") == rec.points[-1][0]
    # The copy the test took read 3 x 64 KiB; the IR the same again, not 64 MiB.
    ir_read = sum(v.bytes_read for v in reads[0].views) - read[0]
    assert ir_read <= 4 * 65536 * 2, ir_read
    # Three 1 MiB IR chunks hold data; the other 61 MiB went as ZERO chunks (no payload).
    assert replicator.last_chunk_bytes_sent <= 3 * MIB + 4096
    # A test failover hands the replica out as qcow2 for a hypervisor that wants it.
    import subprocess
    import sys

    out = site.root / "tfo"
    built = subprocess.run(
        [sys.executable, "-m", "frctl.main", "failover", "test", "--config",
         str(site.server_config), str(vmid), "--out", str(out), "--format", "qcow2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    qcow2 = out / "disks" / "disk0.qcow2"
    assert not (out / "disks" / "disk0.img").exists()
    raw = site.root / "point.raw"
    raw.write_bytes(rec.points[-1][0])
    same = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    assert qcow2.stat().st_size < 4 * MIB  # the zeros stay unallocated


def test_cli_enable_a_qemu_vm_the_service_replicates_it(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """``frctl replication enable --qemu-qmp --qemu-disk``, the primary service, and
    status showing QEMU as the change source with its bitmap intact."""
    import json
    import subprocess
    import sys
    import time

    from .test_cli_replication import frctl

    config = str(site.write_primary_config())
    writers = [daemon.writer(d.node) for d in daemon.disks]
    rng = random.Random(30)
    for w in writers:
        w.random_writes(rng, 10)
    vmid = str(uuid.UUID(int=30, version=4))
    enabled = frctl(
        "replication", "enable", "--config", config, "--vmid", vmid, "--name", "qvm",
        "--disk", f"os={daemon.disks[0].image}", "--disk", f"data={daemon.disks[1].image}",
        "--qemu-qmp", daemon.qmp_socket, "--qemu-disk", "os=disk0", "--qemu-disk", "data=disk1",
        "--qemu-nbd", daemon.nbd_socket,
        "--server", f"{SERVER_HOST}:{server.port}", "--server-name", SERVER_NAME,
        "--frequency", "1s",
    )  # fmt: skip
    assert enabled.returncode == 0, enabled.stderr
    for wrong, said in (
        (["--qemu-qmp", str(site.root / "nowhere.sock")], "cannot be reached"),
        (["--qemu-qmp", daemon.qmp_socket, "--qemu-disk", "swap=disk1"], "no --disk 'swap'"),
        (["--qemu-qmp", daemon.qmp_socket, "--qemu-disk", "os=nonode"], "no block node"),
        (["--qemu-nbd", daemon.nbd_socket], "go with --qemu-qmp"),
    ):
        other = frctl(
            "replication", "enable", "--config", config, "--vmid", str(uuid.uuid4()),
            "--name", "other", "--disk", f"os={site.root / 'server.toml'}",
            "--server", f"{SERVER_HOST}:{server.port}", *wrong,
        )  # fmt: skip
        assert other.returncode == 1, (wrong, other.stderr)
        assert said in other.stderr, (wrong, other.stderr)
    state = PrimaryStateStore(site.state_dir).load(vmid)
    assert [d["size"] for d in state.disks] == [SIZE, SIZE - 3 * 65536]  # QEMU's sizes
    primary = subprocess.Popen(
        [sys.executable, "-m", "frctl.main", "primary", "run", "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=(site.root / "primary.log").open("ab"),
        stdin=subprocess.DEVNULL,
    )
    try:
        waited = frctl("replication", "wait", "--config", config, vmid, "--timeout", "60")
        assert waited.returncode == 0, waited.stderr
        for w in writers:
            w.random_writes(rng, 5)
        deadline = time.monotonic() + 30
        while True:  # until the cycles after the writes carried them
            doc = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)
            row = doc["vms"][0]
            if row["sequence"] >= 1 and all(
                replica(site, uuid.UUID(vmid), name) == w.read(0, w.size)
                for w, name in zip(writers, ("os", "data"), strict=True)
            ):
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.3)
        assert row["change_source"] == "qemu"
        assert row["qemu_bitmap"] == "intact"
        table = frctl("replication", "status", "--config", config).stdout
        assert f"change source: QEMU at {daemon.qmp_socket}, bitmap intact" in table
    finally:
        primary.send_signal(2)
        primary.wait(20)
    assert_clean(daemon)


def _churn(shadow: Path, rng: random.Random, step: int) -> None:
    """Change the ext4 file system in ``shadow``: new files, one removed, one rewritten."""
    import subprocess

    data = shadow.parent / "payload"
    commands = []
    for n in range(3):
        data.with_suffix(f".{n}").write_bytes(rng.randbytes(rng.randrange(1000, 300_000)))
        commands.append(f"write {data.with_suffix(f'.{n}')} f{step}-{n}")
    if step:
        commands.append(f"rm f{step - 1}-0")
    commands.append(f"mkdir d{step}")
    script = shadow.parent / "cmds"
    script.write_text("\n".join(commands) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", str(script), str(shadow)], check=True, capture_output=True
    )


def _push(shadow: Path, before: bytes, writer: GuestWriter) -> None:
    """Write the 4 KiB blocks of ``shadow`` that differ from ``before`` through QEMU."""
    after = shadow.read_bytes()
    for at in range(0, len(after), 4096):
        if after[at : at + 4096] != before[at : at + 4096]:
            writer.write(at, after[at : at + 4096])


def _fsck(image: Path) -> None:
    import subprocess

    checked = subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_an_ext4_guest_file_system_every_recovery_point_passes_e2fsck(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """An ext4 file system inside the qcow2, changed through QEMU between cycles and
    during them (a whole change right after the cycle's point was taken, while the cycle
    reads it), the guest writing its other disk all along: the replica after each cycle
    is the point, not the file system changed since, and it and every recovery point the
    server keeps pass ``e2fsck -fn``."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("debugfs") is None or shutil.which("e2fsck") is None:
        pytest.fail("debugfs and e2fsck are needed: apt-get install e2fsprogs")
    rng = random.Random(40)
    shadow = site.root / "shadow.ext4"
    shadow.write_bytes(bytes(SIZE))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(shadow)], check=True)
    writers = [daemon.writer(d.node) for d in daemon.disks]
    _push(shadow, bytes(SIZE), writers[0])
    vmid = uuid.UUID(int=40, version=4)
    replicator = qemu_replicator(site, daemon, server.port, vmid)
    rec = recording(replicator)
    steps = iter(range(100))

    def churn() -> None:
        before = shadow.read_bytes()
        _churn(shadow, rng, next(steps))
        _push(shadow, before, writers[0])

    with trio.fail_after(90), BackgroundWriter(writers[1:], seed=41):
        for _ in range(6):
            churn()  # between cycles
            at_start = shadow.read_bytes()
            rec.during = churn  # and during the cycle, after its point
            await replicator.cycle()
            rec.during = None
            assert replica(site, vmid, "disk0") == rec.points[-1][0]
            assert rec.points[-1][0] == at_start  # what the guest wrote later is not in it
            assert shadow.read_bytes() != at_start
            copy = site.root / "replica.ext4"
            copy.write_bytes(replica(site, vmid, "disk0"))
            _fsck(copy)
    points = json.loads(
        subprocess.run(
            [sys.executable, "-m", "frctl.main", "replica", "points", "--config",
             str(site.server_config), str(vmid), "--json"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    assert len(points) >= 3
    for point in points:
        out = site.root / f"tfo-{point['sequence']}"
        subprocess.run(
            [sys.executable, "-m", "frctl.main", "failover", "test", "--config",
             str(site.server_config), str(vmid), "--out", str(out), "--point",
             str(point["sequence"])],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        _fsck(out / "disks" / "disk0.img")


async def test_a_planned_failover_compares_through_qemu(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """The guest stopped writing: a planned failover's last cycle and its comparison of
    the replica with the disks read QEMU's point in time (the qcow2's virtual disk, not
    its file), and find them equal."""
    vmid, replicator, rec, writers = await _replicated(site, server, daemon, 50)
    writers[0].write(6 * MIB, b"final words" * 100)
    result = await replicator.prepare_failover()
    assert result.ok
    assert result.blocks == sum(-(-d["size"] // 65536) for d in replicator.state.disks)
    assert_replica_is_last_point(site, vmid, rec)
    assert_clean(daemon)


async def test_primary_and_qemu_both_killed_mid_cycle_then_restarted(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """kill -9 of the primary holding a point in time, then of QEMU; both restarted: the
    fleecing files left are removed, the lost bitmaps resynchronize by digests (no new
    IR), and the replica converges on what the guest wrote."""
    import subprocess
    import sys

    from frtesting.server import child_env

    vmid, replicator, _rec, writers = await _replicated(site, server, daemon, 60)
    source = replicator.qemu
    assert source is not None
    child = subprocess.Popen(
        [sys.executable, "-c", _OPEN_AND_HANG, source.qmp_socket, str(source.work_dir),
         str(source.nbd_socket)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline() == b"open\n"
    writers[0].write(7 * MIB, b"during the point" * 100)
    child.kill()
    child.wait(10)
    assert list(source.work_dir.glob("frrep-fleece-*"))
    for w in writers:
        w.close()
    daemon.kill()
    daemon.start()
    restarted = site.restarted(replicator)
    rec = recording(restarted)
    await restarted.cycle()
    assert restarted.last_resync is not None
    assert restarted.last_resync.method == "digests"
    assert restarted.state.ir_state == IRStage.COMPLETE
    assert restarted.last_chunk_bytes_sent < SIZE // 4
    assert not list(source.work_dir.glob("frrep-fleece-*"))
    assert_replica_is_last_point(site, vmid, rec)
    assert b"during the point" in replica(site, vmid, "disk0")[7 * MIB : 7 * MIB + 20]
    assert_clean(daemon)


async def test_an_overflowed_pending_log_resyncs_by_digests_through_the_point(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """A capture bigger than the pending log's bound: the frozen bitmap is kept (not
    dropped with a capture that did not happen), the cycle resynchronizes by digests from
    the same point in time, and the replica is that point."""
    rng = random.Random(70)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    writers = [daemon.writer(d.node) for d in daemon.disks]
    replicator = qemu_replicator(site, daemon, server.port, vmid, pending_bytes=256 * 1024)
    rec = recording(replicator)
    await replicator.cycle()
    for w in writers:
        w.random_writes(rng, 10)  # far more than 256 KiB
    await replicator.cycle()
    assert replicator.last_resync is not None
    assert replicator.last_resync.method == "digests"
    assert not replicator.pending.overflowed
    assert_replica_is_last_point(site, vmid, rec)
    assert_clean(daemon)
    writers[0].write(MIB, b"small again" * 10)
    await replicator.cycle()
    assert_replica_is_last_point(site, vmid, rec)


async def test_out_of_band_ir_of_a_running_qemu_vm(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """``frctl ir export`` of a QEMU VM reads a point in time through QEMU while the guest
    writes; after ``frctl ir import`` the cycles send only what changed since the export
    (no IR over the network) and the replica converges on the guest's disks."""
    import subprocess
    import sys

    from frproto import Busy

    def frctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "frctl.main", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    rng = random.Random(80)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    writers = [daemon.writer(d.node) for d in daemon.disks]
    for w in writers:
        w.random_writes(rng, 15)
    replicator = qemu_replicator(site, daemon, server.port, vmid)
    config = str(site.write_primary_config())
    out = site.root / "vm.frir"
    import threading

    stop, written = threading.Event(), [0]

    def guest() -> None:  # keeps writing four blocks during the export
        while not stop.is_set():
            writers[written[0] % 2].write((written[0] % 4) * MIB, rng.randbytes(65536))
            written[0] += 1

    running = threading.Thread(target=guest)
    running.start()
    try:
        export = frctl("ir", "export", "--config", config, str(vmid), "--out", str(out))
    finally:
        stop.set()
        running.join()
    assert written[0] > 4
    assert export.returncode == 0, export.stderr
    assert_clean(daemon)
    replicator = site.restarted(replicator)
    with pytest.raises(Busy, match="out-of-band import"):
        await replicator.cycle()  # creates the relationship, waits for the import
    server.stop()
    imported = frctl("ir", "import", "--config", str(site.server_config), str(out))
    assert imported.returncode == 0, imported.stderr
    restarted = site.start_server()
    try:
        replicator.state.recovery_port = restarted.port
        for w in writers:
            w.random_writes(rng, 3)
        await replicator.cycle()  # the import seen: COMPLETE at sequence 0
        assert replicator.state.ir_state == IRStage.COMPLETE
        await replicator.cycle()  # what the guest wrote since the export
        assert replicator.state.sequence == 1
        # Four blocks written during the export, three writes per disk after it: a few
        # blocks, never the disks again.
        assert replicator.last_chunk_bytes_sent < 3 * MIB
        assert replicator.last_resync is None
    finally:
        restarted.stop()
    assert "IR of" not in restarted.log.read_text()
    for w, disk in zip(writers, daemon.disks, strict=True):
        assert replica(site, vmid, disk.node) == w.read(0, w.size), disk.node
    assert_clean(daemon)


def test_the_primary_service_killed_mid_ir_then_restarted_converges(
    site: Site, server: ServerProcess, daemon: QemuDaemon
) -> None:
    """``frctl primary run`` killed with SIGKILL while its IR holds a point in time
    (slowed by a bandwidth limit), the guest writing on: the restarted service removes
    the leftovers, resumes the IR, and the replica converges on the guest's disks."""
    import signal
    import subprocess
    import sys
    import time

    from .test_cli_replication import frctl

    config = str(site.write_primary_config())
    writers = [daemon.writer(d.node) for d in daemon.disks]
    rng = random.Random(90)
    for w in writers:
        w.random_writes(rng, 30)
    vmid = str(uuid.UUID(int=90, version=4))
    enabled = frctl(
        "replication", "enable", "--config", config, "--vmid", vmid, "--name", "qkill",
        "--disk", f"disk0={daemon.disks[0].image}", "--disk", f"disk1={daemon.disks[1].image}",
        "--qemu-qmp", daemon.qmp_socket, "--qemu-nbd", daemon.nbd_socket,
        "--server", f"{SERVER_HOST}:{server.port}", "--server-name", SERVER_NAME,
        "--frequency", "1s", "--bandwidth", "4M",
    )  # fmt: skip
    assert enabled.returncode == 0, enabled.stderr

    def run() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "frctl.main", "primary", "run", "--config", config],
            stdout=subprocess.DEVNULL,
            stderr=(site.root / "primary.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )

    primary = run()
    deadline = time.monotonic() + 30
    while not frrep_objects(daemon)["exports"]:  # the IR's point in time is open
        assert time.monotonic() < deadline, "the IR never opened a point in time"
        time.sleep(0.05)
    time.sleep(0.5)
    primary.send_signal(signal.SIGKILL)
    primary.wait(10)
    assert frrep_objects(daemon)["jobs"]  # left behind by the kill
    for w in writers:
        w.random_writes(rng, 5)
    primary = run()
    try:
        deadline = time.monotonic() + 60
        while True:
            state = PrimaryStateStore(site.state_dir).load(vmid)
            if state.ir_state == IRStage.COMPLETE and state.sequence >= 1:
                converged = all(
                    replica(site, uuid.UUID(vmid), d.node) == w.read(0, w.size)
                    for w, d in zip(writers, daemon.disks, strict=True)
                )
                if converged:
                    break
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
    finally:
        primary.send_signal(signal.SIGINT)
        primary.wait(20)
    assert_clean(daemon)

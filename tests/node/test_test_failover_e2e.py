"""Test failover: a VM built from each kept recovery point, elsewhere, while replication
goes on; the hooks run; the cleanup removes only what a test failover made."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.server import ServerProcess
from node.failover.test import TEST_MARKER, clean_up_test_failover
from node.storage.point_copy import copy_point

from .site import Site
from .test_cli_replication import frctl
from .test_replication_e2e import MIB, make_image, scribble, server

__all__ = ["server"]


async def test_a_test_vm_from_each_kept_point_equals_that_cycles_disk(
    site: Site, server: ServerProcess, tmp_path: Path
) -> None:
    rng = random.Random(31)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 4 * MIB, rng)
    vm = site.replicator(vmid, "vm", [image], server.port)
    copies: dict[int, bytes] = {}
    with trio.fail_after(120):
        await vm.cycle()  # IR: point 0
        copies[0] = image.read_bytes()
        for _ in range(3):
            scribble(image, rng, writes=6)
            await vm.cycle()
            copies[vm.state.sequence] = image.read_bytes()
        built: dict[int, Path] = {}
        for seq in (0, 1, 2, 3):  # every kept point (the server keeps 4)
            out = tmp_path / f"test-{seq}"
            await trio.to_thread.run_sync(copy_point, site.storage, vmid, out, seq)
            built[seq] = out
        # Again while the primary goes on replicating: its cycles run meanwhile, and the
        # copy of the newest point must still be exactly that point.
        point = vm.state.sequence

        async def replicate_on() -> None:
            scribble(image, rng, writes=3)
            await vm.cycle()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replicate_on)
            out = tmp_path / "test-during"
            await trio.to_thread.run_sync(copy_point, site.storage, vmid, out, point)
        assert (out / "disks" / "disk0.img").read_bytes() == copies[point]
        # Point 0 is no longer kept (5 points made, 4 kept): refused, not guessed.
        with pytest.raises(fp.OutOfSequence):
            copy_point(site.storage, vmid, tmp_path / "gone", sequence=0)
    for seq, out in built.items():
        assert (out / "disks" / "disk0.img").read_bytes() == copies[seq], f"point {seq}"
    # Replication went on: the replica is at the primary's latest cycle.
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


def test_the_cli_builds_runs_the_hooks_and_cleans_up(site: Site, tmp_path: Path) -> None:
    rng = random.Random(32)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    proc = site.start_server()
    try:
        vm = site.replicator(vmid, "vm", [image], proc.port)
        trio.run(vm.cycle)
        out = tmp_path / "tfo"
        started = tmp_path / "started.txt"
        result = frctl(
            "failover", "test", "--config", str(site.server_config), str(vmid),
            "--out", str(out), "--start-command", f'echo "$FRREP_DISKS" > {started}',
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "replication goes on" in result.stdout
        disk = out / "disks" / "disk0.img"
        assert disk.read_bytes() == image.read_bytes()
        assert started.read_text().strip() == str(disk)  # the start hook saw the disks
        assert (out / TEST_MARKER).exists()
        # Only a test failover's directory is removed.
        with pytest.raises(ValueError, match="not a test failover"):
            clean_up_test_failover(tmp_path)
        stopped = tmp_path / "stopped.txt"
        done = frctl("failover", "cleanup", str(out), "--stop-command", f"touch {stopped}")
        assert done.returncode == 0, done.stderr
        assert stopped.exists()
        assert not out.exists()
        missing = frctl(
            "failover", "test", "--config", str(site.server_config), str(uuid.uuid4()),
            "--out", str(tmp_path / "x"),
        )  # fmt: skip
        assert missing.returncode == 1
        assert "no replica" in missing.stderr
    finally:
        proc.stop()


def test_unplanned_failover_at_a_point_then_the_old_primary_is_refused(
    site: Site, tmp_path: Path
) -> None:
    rng = random.Random(33)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    copies: dict[int, bytes] = {}
    proc = site.start_server()
    vm = site.replicator(vmid, "vm", [image], proc.port)
    try:
        trio.run(vm.cycle)
        copies[0] = image.read_bytes()
        for _ in range(3):
            scribble(image, rng, writes=5)
            trio.run(vm.cycle)
            copies[vm.state.sequence] = image.read_bytes()
        args = ["failover", "unplanned", "--config", str(site.server_config), str(vmid)]
    finally:
        # With the server stopped (a running one does it itself, asked on its control
        # socket: tests/node/test_unplanned_running_e2e.py).
        proc.stop()
    started = tmp_path / "started.txt"
    hook = f'echo "$FRREP_DISKS" > {started}'
    done = frctl(*args, "--point", "2", "--json", "--start-command", hook)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["sequence"] == 2
    assert result["generation"] == 2
    # The VM runs from the replica, brought back exactly to point 2.
    disk = site.replica_image(vmid, 0)
    assert started.read_text().strip() == str(disk)
    assert disk.read_bytes() == copies[2]
    # The old primary comes back: refused, whatever it sends; the replica is untouched.
    proc = site.start_server(port=vm.state.recovery_port)
    try:
        scribble(image, rng, writes=5)
        with pytest.raises(fp.NotAuthorized, match="failed over"):
            trio.run(vm.cycle)
    finally:
        proc.stop()
    assert disk.read_bytes() == copies[2]


def test_planned_failover_loses_nothing(site: Site, tmp_path: Path) -> None:
    # One command at the primary: it stops the VM, sends what is left, and the recovery
    # side checks the final state and takes the VM over at that sequence.
    rng = random.Random(34)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    config = site.write_primary_config()
    proc = site.start_server()
    vm = site.replicator(vmid, "vm", [image], proc.port)
    try:
        trio.run(vm.cycle)
        scribble(image, rng, writes=6)
        trio.run(vm.cycle)
        scribble(image, rng, writes=6)  # written after the last cycle: not sent yet
        final = image.read_bytes()
        stopped = tmp_path / "stopped.txt"
        done = frctl(
            "failover", "planned", "--config", str(config), str(vmid),
            "--stop-command", f"touch {stopped}", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert stopped.exists()
        result = json.loads(done.stdout)
        assert result["sequence"] == 2
        assert result["generation"] == 2
        state = vm.store.load(str(vmid))
        assert state.halted is not None
        assert "planned failover" in state.halted
        assert state.failed_over_generation == 2
    finally:
        proc.stop()
    assert site.replica_image(vmid, 0).read_bytes() == final  # nothing lost

"""Planned failover in one step (protocol 1.1), with real processes: the VM writes until
the stop hook, the last writes arrive, the recovery side takes the VM over at exactly the
final disk, and reverse replication starts by itself and carries the new side's writes
back."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import trio

from frtesting.server import ServerProcess, start_server_process
from node.storage.layout import ReplicaLayout

from .site import PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME, Site
from .test_cli_replication import frctl
from .test_replication_e2e import MIB, make_image

BLOCK = 65536

#: The VM: writes a random 64 KiB block somewhere in its 4 MiB disk every few ms, each
#: write flushed, until it is stopped (SIGTERM); then it says how many it wrote, in the
#: file ``argv[3]`` (the stop hook waits for it: the VM is down) and on stdout.
WRITER = """
import os, random, signal, sys
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
rng = random.Random(int(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_WRONLY)
print("started", flush=True)
n = 0
while not stop:
    os.pwrite(fd, rng.randbytes(65536), rng.randrange(64) * 65536)
    os.fsync(fd)
    n += 1
os.close(fd)
open(sys.argv[3], "w").write(str(n))
print(n, flush=True)
"""


def a_server_config(site: Site, tmp_path: Path) -> Path:
    """Site A's own recovery server (the former primary's host): it admits B."""
    config = tmp_path / "a-server.toml"
    config.write_text(
        f"""
[server]
name = "{PRIMARY_NAME}"
listen = "{PRIMARY_HOST}"
port = 0

[tls]
cert = "{site.certs}/{PRIMARY_NAME}.pem"
key = "{site.certs}/{PRIMARY_NAME}-key.pem"
ca = "{site.certs}/ca.pem"

[[authorization]]
primary = "{SERVER_NAME}"
storage = "{tmp_path / "a-replicas"}"
trust_group = "reverse"
"""
    )
    return config


def b_primary_config(site: Site) -> Path:
    """A primary configuration for B's reverse replication (what B's server runs)."""
    path = site.root / "b-primary.toml"
    path.write_text(
        f"""
[primary]
name = "{SERVER_NAME}"
state_dir = "{site.root / "reverse-primary"}"
local_address = "{SERVER_HOST}"

[tls]
cert = "certs/{SERVER_NAME}.pem"
key = "certs/{SERVER_NAME}-key.pem"
ca = "certs/ca.pem"
"""
    )
    return path


def wait_until_equal(a: Path, b: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if a.exists() and a.read_bytes() == b.read_bytes():
            return
        time.sleep(0.2)
    raise AssertionError(f"{a} did not come to equal {b} within {timeout} s")


def test_planned_failover_in_one_step_then_reverse(site: Site, tmp_path: Path) -> None:
    rng = random.Random(2001)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(4 * MIB))
    # B, the recovery server, replicates back every second once it runs a VM.
    site.server_config.write_text(site.server_config.read_text() + "\n[reverse]\nfrequency = 1\n")
    b_server = site.start_server()
    a_server: ServerProcess | None = None
    writer: subprocess.Popen[str] | None = None
    try:
        vm = site.replicator(vmid, "web01", [image], b_server.port)
        trio.run(vm.cycle)  # the IR
        a_server = start_server_process(a_server_config(site, tmp_path), tmp_path)
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(image), "7", str(tmp_path / "vm-stopped")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        # (No cycle while it writes: a scan-mode capture needs the disks still, which the
        # capture hooks give a real VM; the last cycle, after the stop hook, sends it all.)
        time.sleep(0.3)
        stopped = tmp_path / "vm-stopped"
        stop = f"kill {writer.pid}; while [ ! -e {stopped} ]; do sleep 0.02; done"
        done = frctl(
            "failover", "planned", "--config", str(site.write_primary_config()), "web01",
            "--stop-command", stop, "--server-config", str(tmp_path / "a-server.toml"),
            "--reverse-port", str(a_server.port), "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        writes = int(writer.communicate(timeout=10)[0].strip())
        assert writes > 0  # the VM was writing until the stop hook
        result = json.loads(done.stdout)
        final = image.read_bytes()
        # The last writes arrived: B runs the VM from exactly the final disk, at generation 2.
        assert result["generation"] == 2
        b_disk = ReplicaLayout(site.storage, vmid).image("disk0")
        assert b_disk.read_bytes() == final
        b_state = json.loads((site.storage / str(vmid) / "state.json").read_text())
        assert b_state["failed_over"] is True
        assert b_state["generation"] == 2
        assert b_state["applied_sequence"] == result["sequence"]
        # A is the VM's recovery side now: its replica is its own final disk.
        a_disk = ReplicaLayout(tmp_path / "a-replicas", vmid).image("disk0")
        assert a_disk.read_bytes() == final
        # The VM runs at B and writes there; B's reverse replication carries it back.
        with b_disk.open("r+b") as f:
            for block in (3, 17, 40):
                f.seek(block * BLOCK)
                f.write(rng.randbytes(BLOCK))
        wait_until_equal(a_disk, b_disk)
        # A's old primary replicates it no more (failed over, and B would refuse it).
        status = frctl(
            "replication", "status", "--config", str(site.write_primary_config()), "--json"
        )
        a_row = json.loads(status.stdout)["vms"][0]
        assert a_row["state"] == "failed over"
        assert a_row["failover"] == {"generation": 2}
        # B replicates it back: status at B shows the direction and the generation.
        b_status = frctl("replication", "status", "--config", str(b_primary_config(site)), "--json")
        b_row = json.loads(b_status.stdout)["vms"][0]
        assert b_row["direction"] == "reverse"
        assert b_row["generation"] == 2
        assert b_row["failover"] is None
        # Failback: the same command at B (its reverse replication's primary), the VM
        # stopped there: A takes it over at exactly B's final disk, nothing lost.
        b_final = b_disk.read_bytes()
        back = frctl(
            "failover", "planned", "--config", str(b_primary_config(site)), str(vmid),
            "--stop-command", "true", "--json",
        )  # fmt: skip
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["generation"] == 3
        assert a_disk.read_bytes() == b_final
        a_state = json.loads((tmp_path / "a-replicas" / str(vmid) / "state.json").read_text())
        assert a_state["failed_over"] is True
        assert a_state["generation"] == 3
        back_row = json.loads(
            frctl("replication", "status", "--config", str(b_primary_config(site)), "--json").stdout
        )["vms"][0]
        assert back_row["state"] == "failed over"
        assert back_row["failover"] == {"generation": 3}
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        b_server.stop()
        if a_server is not None:
            a_server.stop()


def test_planned_failover_refused_when_the_replica_differs(site: Site, tmp_path: Path) -> None:
    """A replica that does not hold the final state is not taken over: nothing switches."""
    rng = random.Random(2002)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    server = site.start_server()
    try:
        vm = site.replicator(vmid, "db01", [image], server.port)
        trio.run(vm.cycle)
        # A stop hook that fails stops it all: nothing is asked, nothing changes.
        hook_failed = frctl(
            "failover", "planned", "--config", str(site.write_primary_config()), str(vmid),
            "--stop-command", "echo cannot >&2; exit 3",
            "--server-config", str(a_server_config(site, tmp_path)),
        )  # fmt: skip
        assert hook_failed.returncode == 1
        assert "exited 3" in hook_failed.stderr
        assert not (tmp_path / "a-replicas" / str(vmid)).exists()
        assert vm.store.load(str(vmid)).halted is None
        # The replica is damaged behind the server's back (a bit rot, say).
        replica = site.replica_image(vmid, 0)
        with replica.open("r+b") as f:
            f.seek(5 * BLOCK)
            f.write(b"\xff" * 16)
        done = frctl(
            "failover", "planned", "--config", str(site.write_primary_config()), str(vmid),
            "--server-config", str(a_server_config(site, tmp_path)),
        )  # fmt: skip
        assert done.returncode == 1
        assert "differs" in done.stderr
        state = json.loads((site.storage / str(vmid) / "state.json").read_text())
        assert not state.get("failed_over")
        assert state["generation"] == 1
        # The replica made of A's disks for the reverse direction is removed again.
        assert not (tmp_path / "a-replicas" / str(vmid)).exists()
    finally:
        server.stop()

"""No operator action or disk change silently loses data (issue 12), tried as an operator
would: a recovery server process, a `frctl primary run` process and `frctl` commands, all
on loopback. Each test is one of the reported cases and failed on the code before it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from frtesting.server import ServerProcess

from .site import Site
from .test_cli_replication import frctl

MIB = 1024 * 1024


def wait_until(what: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll ``what`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what}")
        time.sleep(every)


class Operator:
    """One primary site driven through the CLI: its config, its VMs, its service."""

    def __init__(self, site: Site, server: ServerProcess) -> None:
        self.site = site
        self.server = server
        self.config = str(site.write_primary_config())
        self.services: list[subprocess.Popen[bytes]] = []
        #: Where VMs enabled from now on replicate to ("host:port"); None: the server
        #: itself (a test puts a fault proxy in between).
        self.server_address: str | None = None

    def enable(self, vmid: str, name: str, *disks: str, **options: str) -> Any:
        extra = [x for key, value in options.items() for x in (f"--{key}", value)]
        return frctl(
            "replication",
            "enable",
            "--config",
            self.config,
            "--vmid",
            vmid,
            "--name",
            name,
            *[x for disk in disks for x in ("--disk", disk)],
            "--server",
            self.server_address or f"127.0.0.2:{self.server.port}",
            "--server-name",
            "r1.example.com",
            *extra,
        )

    def replicating(self, seed: int, name: str, size: int, **options: str) -> tuple[str, Path]:
        """A new VM with one random disk of ``size`` bytes, enabled at a frequency of 1 s,
        the service started, and the IR complete: ``(vmid, image)``."""
        rng = random.Random(seed)
        vmid = new_vm(rng)
        image = disk(self.site.root / "disk0.img", size, rng)
        enabled = self.enable(vmid, name, f"disk0={image}", frequency="1s", **options)
        assert enabled.returncode == 0, enabled.stderr
        self.start_service()
        self.in_sync(vmid, timeout=90)
        return vmid, image

    def start_service(self) -> subprocess.Popen[bytes]:
        service = subprocess.Popen(
            [sys.executable, "-m", "frctl.main", "primary", "run", "--config", self.config],
            stdout=subprocess.DEVNULL,
            stderr=(self.site.root / "primary.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )
        self.services.append(service)
        return service

    def stop_services(self) -> None:
        for service in self.services:
            if service.poll() is None:
                service.send_signal(signal.SIGINT)
                try:
                    service.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    service.kill()
                    service.wait()
        self.services.clear()

    def status(self, vmid: str) -> dict[str, Any]:
        doc = json.loads(frctl("replication", "status", "--config", self.config, "--json").stdout)
        (row,) = [r for r in doc["vms"] if r["vmid"] == vmid]
        return row  # type: ignore[no-any-return]

    def in_sync(self, vmid: str, timeout: float = 60.0) -> None:
        done = frctl(
            "replication", "wait", "--config", self.config, vmid, "--timeout", str(timeout)
        )
        assert done.returncode == 0, (done.stderr, self.log())

    def state_file(self, vmid: str) -> Path:
        return self.site.state_dir / vmid / "state.json"

    def log(self) -> str:
        path = self.site.root / "primary.log"
        return path.read_text()[-4000:] if path.exists() else ""


@pytest.fixture
def operator(site: Site) -> Iterator[Operator]:
    server = site.start_server()
    op = Operator(site, server)
    try:
        yield op
    finally:
        op.stop_services()
        server.stop()


def new_vm(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def disk(path: Path, size: int, rng: random.Random) -> Path:
    path.write_bytes(rng.randbytes(size))
    return path


def replica_points(site: Site, vmid: str) -> list[int]:
    listed = frctl("replica", "points", "--config", str(site.server_config), vmid, "--json")
    assert listed.returncode == 0, listed.stderr
    return [p["sequence"] for p in json.loads(listed.stdout)]


def test_a_disk_that_grows_halts_verify_says_so_and_reseed_carries_it_on(
    operator: Operator,
) -> None:
    vmid, image = operator.replicating(1201, "web01", 4 * MIB)
    rng = random.Random(1201 + 1)
    # Grown by 2 MiB, 1 MiB of it written past the old end (as a guest would, after a
    # resize of its virtual disk).
    with image.open("r+b") as f:
        f.truncate(6 * MIB)
        f.seek(4 * MIB + 12345)
        f.write(rng.randbytes(MIB))
    row = wait_until(lambda: (r := operator.status(vmid))["halted"] and r)
    assert (row["state"], row["health"]) == ("halted", "critical")
    assert "disk0 grew from 4 MiB to 6 MiB" in row["halted"]
    assert f"frctl replication reseed {vmid}" in row["halted"]
    check = frctl("replication", "status", "--config", operator.config, "--check")
    assert check.returncode == 6
    verified = frctl("replication", "verify", "--config", operator.config, vmid)
    assert verified.returncode == 3, verified.stdout
    assert "disk0 is 6 MiB on the primary but 4 MiB in the replica" in verified.stdout
    # The replica was left as it was (its old extent, never a part of the new data).
    assert operator.site.replica_image(uuid.UUID(vmid), 0).stat().st_size == 4 * MIB

    asked = frctl("replication", "reseed", "--config", operator.config, vmid)
    assert asked.returncode == 1  # destructive: asks first
    assert "--yes" in asked.stderr
    reseeded = frctl("replication", "reseed", "--config", operator.config, "web01", "--yes")
    assert reseeded.returncode == 0, reseeded.stderr
    assert "disk0 6291456 bytes" in reseeded.stdout
    operator.in_sync(vmid)
    assert operator.site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()
    verified = frctl("replication", "verify", "--config", operator.config, vmid, "--json")
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["size_differences"] == []


def test_a_disk_that_shrinks_halts_and_the_replica_keeps_its_data(operator: Operator) -> None:
    vmid, image = operator.replicating(1202, "db01", 4 * MIB)
    before = image.read_bytes()
    points = replica_points(operator.site, vmid)
    with image.open("r+b") as f:
        f.truncate(1 * MIB)
    row = wait_until(lambda: (r := operator.status(vmid))["halted"] and r)
    assert (row["state"], row["health"]) == ("halted", "critical")
    assert "disk0 shrank from 4 MiB to 1 MiB" in row["halted"]
    time.sleep(2.5)  # more than two cycles: nothing may be sent meanwhile
    replica = operator.site.replica_image(uuid.UUID(vmid), 0)
    assert replica.read_bytes() == before  # never zeros in place of the data
    assert replica_points(operator.site, vmid) == points
    verified = frctl("replication", "verify", "--config", operator.config, vmid)
    assert verified.returncode == 3
    assert "disk0 is 1 MiB on the primary but 4 MiB in the replica" in verified.stdout
    # The shrink was a mistake: the image is restored, and resume carries on.
    image.write_bytes(before)
    assert frctl("replication", "resume", "--config", operator.config, vmid).returncode == 0
    with image.open("r+b") as f:
        f.seek(MIB)
        f.write(b"after the restore" * 100)
    wait_until(lambda: operator.status(vmid)["sequence"] > max(points), timeout=30)
    operator.in_sync(vmid)
    assert operator.status(vmid)["health"] == "normal"
    assert replica.read_bytes() == image.read_bytes()


def test_a_second_enable_is_refused_and_changes_nothing(operator: Operator) -> None:
    vmid, image = operator.replicating(1203, "app01", 2 * MIB)
    rng = random.Random(1203 + 1)
    service = operator.services[-1]
    # While the service runs: no silent reset of the frequency.
    again = operator.enable(vmid, "app01", f"disk0={image}", frequency="1h")
    assert again.returncode == 1
    assert f"VM {vmid} is already enabled (replication/app01, COMPLETE" in again.stderr
    assert operator.status(vmid)["health"] == "normal"
    state = json.loads(operator.state_file(vmid).read_text())
    assert state["frequency_s"] == 1.0
    # While it is stopped: the state is left byte for byte, and replication carries on.
    with image.open("r+b") as f:
        f.write(rng.randbytes(100_000))
    wait_until(lambda: operator.status(vmid)["sequence"] >= 1)
    operator.in_sync(vmid)
    operator.stop_services()
    assert service.returncode is not None
    saved = operator.state_file(vmid).read_bytes()
    sequence = json.loads(saved)["sequence"]
    again = operator.enable(vmid, "app01", f"disk0={image}")
    assert again.returncode == 1
    assert "already enabled" in again.stderr
    assert operator.state_file(vmid).read_bytes() == saved
    # The way to change a setting: `set`, which keeps everything else.
    changed = frctl("replication", "set", "--config", operator.config, "app01", "--frequency", "2s")
    assert changed.returncode == 0, changed.stderr
    state = json.loads(operator.state_file(vmid).read_text())
    assert (state["frequency_s"], state["sequence"], state["ir_state"]) == (
        2.0,
        sequence,
        "COMPLETE",
    )
    operator.start_service()
    with image.open("r+b") as f:
        f.seek(MIB)
        f.write(rng.randbytes(100_000))
    wait_until(lambda: operator.status(vmid)["sequence"] > sequence)
    operator.in_sync(vmid)
    assert operator.site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()
    verified = frctl("replication", "verify", "--config", operator.config, vmid)
    assert verified.returncode == 0, verified.stdout


def test_a_pause_during_a_cycle_is_never_lost(operator: Operator) -> None:
    rng = random.Random(1204)
    vmid = new_vm(rng)
    image = disk(operator.site.root / "disk0.img", 8 * MIB, rng)
    # 2 MB/s and about 3 MiB of changes per cycle: a cycle takes over a second, and with
    # a frequency of 1 s the service is nearly always inside one.
    enabled = operator.enable(vmid, "busy01", f"disk0={image}", frequency="1s", bandwidth="2M")
    assert enabled.returncode == 0
    operator.start_service()
    operator.in_sync(vmid, timeout=90)
    waited = 0
    for attempt in range(3):
        with image.open("r+b") as f:
            for _ in range(48):
                f.seek(rng.randrange(0, 8 * MIB - 65536))
                f.write(rng.randbytes(65536))
        # Into the cycle that captures these writes.
        time.sleep(1.2 + rng.random())
        paused = frctl("replication", "pause", "--config", operator.config, vmid)
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.strip() == "replication/busy01 paused"
        waited += "waiting for the running cycle to end" in paused.stderr
        after = json.loads(operator.state_file(vmid).read_text())
        assert after["paused"] is True
        # The disk changes, cycles would be due: nothing is captured or sent.
        with image.open("r+b") as f:
            f.write(rng.randbytes(65536))
        time.sleep(3)
        still = json.loads(operator.state_file(vmid).read_text())
        assert still["paused"] is True, f"attempt {attempt}: the pause was lost"
        assert still["sequence"] == after["sequence"]
        assert still["pending_bytes"] == after["pending_bytes"]
        assert still["last_cycle_started_at"] == after["last_cycle_started_at"]
        assert operator.status(vmid)["state"] == "paused"
        assert frctl("replication", "resume", "--config", operator.config, vmid).returncode == 0
    assert waited >= 1, "no pause came during a cycle: the test did not test it"
    # The write made while paused travels once resumed.
    wait_until(lambda: operator.status(vmid)["sequence"] > still["sequence"], timeout=90)
    operator.in_sync(vmid, timeout=90)
    assert operator.site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()


def test_a_second_primary_service_on_the_same_state_is_refused(operator: Operator) -> None:
    vmid, image = operator.replicating(1205, "one01", 2 * MIB)
    rng = random.Random(1205 + 1)
    first = operator.services[-1]
    second = frctl("primary", "run", "--config", operator.config, timeout=30)
    assert second.returncode == 1
    assert f"another primary service (pid {first.pid}) already runs" in second.stderr
    assert first.poll() is None  # the first one carries on
    with image.open("r+b") as f:
        f.write(rng.randbytes(70_000))
    wait_until(lambda: operator.status(vmid)["sequence"] >= 1)
    # Once the first is gone, a new one may start (a killed service leaves no lock).
    first.kill()
    first.wait()
    third = operator.start_service()
    time.sleep(1.5)
    assert third.poll() is None, operator.log()


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("a path in the name", {"name": "../evil"}, "holds a path separator"),
        ("a path in the disk id", {"disk_id": "../x"}, "disk id '../x' must match"),
        ("the same disk id twice", {"twice": True}, "disk id 'disk0' appears twice"),
        ("the nil VMID", {"vmid": str(uuid.UUID(int=0))}, "is the nil or max GUID"),
        ("a disk that does not exist", {"missing": True}, "does not exist"),
        ("an empty disk", {"empty": True}, "is empty"),
        ("a disk of another VM", {"shared": True}, "is already a disk of replication/other"),
        ("a bad block size", {"block": "1000"}, "block_size 1000 is not a positive multiple"),
    ],
)
def test_enable_refuses_what_every_cycle_would_refuse(
    operator: Operator, case: str, args: dict[str, Any], message: str
) -> None:
    rng = random.Random(1206)
    root = operator.site.root
    image = disk(root / "disk0.img", MIB, rng)
    other = disk(root / "other.img", MIB, rng)
    if args.get("shared"):
        assert operator.enable(new_vm(rng), "other", f"disk0={other}").returncode == 0
        image = other
    if args.get("empty"):
        image.write_bytes(b"")
    if args.get("missing"):
        image = root / "nope.img"
    disks = [f"{args.get('disk_id', 'disk0')}={image}"]
    if args.get("twice"):
        disks.append(f"disk0={disk(root / 'disk1.img', MIB, rng)}")
    options = {"block-size": args["block"]} if "block" in args else {}
    vmid = args.get("vmid", new_vm(rng))
    refused = operator.enable(vmid, args.get("name", "vm"), *disks, **options)
    assert refused.returncode == 1, (case, refused.stdout)
    assert message in refused.stderr, (case, refused.stderr)
    rows = json.loads(frctl("replication", "status", "--config", operator.config, "--json").stdout)
    assert [r["name"] for r in rows["vms"]] == (["other"] if args.get("shared") else [])


def test_a_disk_deleted_while_replicating_is_critical_with_its_reason(
    operator: Operator,
) -> None:
    vmid, image = operator.replicating(1208, "gone01", 2 * MIB)
    kept = image.read_bytes()
    os.unlink(image)
    row = wait_until(lambda: (r := operator.status(vmid))["last_error"] and r)
    assert row["health"] == "critical"
    assert row["last_error"] == f"disk0: the image {image} does not exist"
    table = frctl("replication", "status", "--config", operator.config)
    assert f"critical: disk unavailable: disk0: the image {image} does not exist" in table.stdout
    assert frctl("replication", "status", "--config", operator.config, "--check").returncode == 6
    # The storage comes back, written meanwhile: so does replication, by itself.
    sequence = row["sequence"]
    image.write_bytes(kept)
    with image.open("r+b") as f:
        f.write(b"written while the disk was away" * 100)
    row = wait_until(
        lambda: (
            (r := operator.status(vmid))["sequence"] > sequence and r["health"] == "normal" and r
        ),
        timeout=90,
    )
    assert row["last_error"] is None
    assert operator.site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()


def test_a_resync_from_the_cli_while_paused_is_where_the_service_carries_on(
    operator: Operator,
) -> None:
    # The paused service's replicator knew the sequence and digest maps from before the
    # resync; carrying on from them would number a batch the replica already applied.
    vmid, image = operator.replicating(1209, "rs01", 4 * MIB)
    rng = random.Random(1209 + 1)
    assert frctl("replication", "pause", "--config", operator.config, vmid).returncode == 0
    with image.open("r+b") as f:
        f.write(rng.randbytes(300_000))
    resynced = frctl("replication", "resync", "--config", operator.config, vmid, "--json")
    assert resynced.returncode == 0, resynced.stderr
    after_resync = json.loads(resynced.stdout)["sequence"]
    assert after_resync >= 1
    assert frctl("replication", "resume", "--config", operator.config, vmid).returncode == 0
    with image.open("r+b") as f:
        f.seek(2 * MIB)
        f.write(rng.randbytes(300_000))
    row = wait_until(
        lambda: (
            (r := operator.status(vmid))["sequence"] > after_resync
            and r["health"] == "normal"
            and r
        )
    )
    assert row["last_error"] is None, row
    operator.in_sync(vmid)
    assert operator.site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()
    verified = frctl("replication", "verify", "--config", operator.config, vmid)
    assert verified.returncode == 0, verified.stdout

"""Kill -9 the recovery server and the primary at random moments; nothing acknowledged is
lost, the replica is always exactly one point (never a mix), no IR is repeated.

``FRREP_E2E_KILLS`` sets how many server kills (default 12; the storage crash tests in
``tests/node/storage`` add about 90 more kills of a process applying batches).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import trio

import frproto as fp
from frlink.tls import TLSFailure
from node.primary.state import PrimaryStateStore
from node.storage import ReplicaStore

from .site import Site
from .test_replication_e2e import make_image, scribble

MIB = 1024 * 1024


def _check_replica(
    site: Site, vmid: uuid.UUID, snapshots: dict[int, list[bytes]], acked: int
) -> int:
    """Recover the (dead) server's store offline and check the replica; its sequence."""
    with ReplicaStore(site.storage, keep_points=4) as store:
        store.recover()
        if not store.exists(vmid):
            return -1
        replica = store.open(vmid)
        if replica.ir_state.name != "COMPLETE":
            return -1
        seq = replica.applied_sequence
        assert seq >= acked, f"replica at {seq}, but {acked} was acknowledged"
        images = [replica.image_path(i).read_bytes() for i in range(len(replica.disks))]
        assert images == snapshots[seq], f"replica is not exactly point {seq}"
        return seq


async def test_kill_the_recovery_server_during_ir_and_apply(site: Site) -> None:
    kills = int(os.environ.get("FRREP_E2E_KILLS", "12"))
    rng = random.Random(int(os.environ.get("FRREP_SEED", "21")))
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = [make_image(site.root / f"disk{i}.img", 6 * MIB, rng) for i in range(2)]
    server = site.start_server()
    port = server.port
    replicator = site.replicator(vmid, "vm", images, port)
    snapshots: dict[int, list[bytes]] = {0: [p.read_bytes() for p in images]}
    seen_points: set[int] = set()
    with trio.fail_after(300):
        for _ in range(kills):
            deadline = time.monotonic() + rng.uniform(0.05, 0.6)

            async def replicate() -> None:
                while True:
                    if replicator.state.ir_state == "COMPLETE":
                        cycles = replicator.pending.cycles()
                        base = cycles[-1].sequence if cycles else replicator.state.sequence
                        scribble(images[rng.randrange(2)], rng, writes=3)
                        snapshots[base + 1] = [p.read_bytes() for p in images]
                    try:
                        await replicator.cycle()
                    except (OSError, TLSFailure, trio.BrokenResourceError, fp.FrprotoError):
                        return  # the server died under us

            async with trio.open_nursery() as nursery:
                nursery.start_soon(replicate)
                await trio.sleep_until(trio.current_time() + (deadline - time.monotonic()))
                server.kill()
            seen_points.add(_check_replica(site, vmid, snapshots, replicator.state.sequence))
            server = site.start_server(port=port)
        # After the last restart everything pending arrives, and the replica is current.
        await replicator.cycle()
    server.stop()
    assert replicator.pending.cycles() == []
    final = _check_replica(site, vmid, snapshots, replicator.state.sequence)
    assert final == replicator.state.sequence
    assert [site.replica_image(vmid, i).read_bytes() for i in range(2)] == [
        p.read_bytes() for p in images
    ]
    assert len(seen_points) >= 2  # the kills landed at different points


def _primary(site: Site, config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "frctl.main", "primary", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(site.root / "primary.log").open("ab"),
        stdin=subprocess.DEVNULL,
    )


def test_kill_the_primary_mid_cycle_repeats_no_ir(site: Site) -> None:
    rng = random.Random(int(os.environ.get("FRREP_SEED", "5")))
    server = site.start_server()
    config = site.write_primary_config()
    image = make_image(site.root / "disk0.img", 8 * MIB, rng)
    vmid = str(uuid.UUID(bytes=rng.randbytes(16), version=4))
    enable = subprocess.run(
        [
            sys.executable,
            "-m",
            "frctl.main",
            "replication",
            "enable",
            "--config",
            str(config),
            "--vmid",
            vmid,
            "--name",
            "vm",
            "--disk",
            f"disk0={image}",
            "--server",
            f"127.0.0.2:{server.port}",
            "--server-name",
            "r1.example.com",
            "--frequency",
            "0.2s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert enable.returncode == 0, enable.stderr
    store = PrimaryStateStore(site.state_dir)
    try:
        for _ in range(6):
            primary = _primary(site, config)
            time.sleep(rng.uniform(0.2, 1.2))
            scribble(image, rng, writes=4)
            time.sleep(rng.uniform(0.0, 0.4))
            primary.send_signal(signal.SIGKILL)
            primary.wait(timeout=10)
        # Let it finish: no more writes; wait for a cycle that leaves nothing pending.
        primary = _primary(site, config)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                state = store.load(vmid)
                replica = site.replica_image(uuid.UUID(vmid), 0)
                if (
                    state.ir_state == "COMPLETE"
                    and state.pending_bytes == 0
                    and replica.exists()
                    and replica.read_bytes() == image.read_bytes()
                ):
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("replication did not catch up after the kills")
        finally:
            primary.send_signal(signal.SIGKILL)
            primary.wait(timeout=10)
    finally:
        server.stop()
    # One IR only, even though the primary was killed six times. A kill that lands during
    # the IR interrupts it ("IR of ... interrupted: resumes at ..."), and the next primary
    # resumes it from there: that is not a repeat, and only the completion is counted.
    text = server.log.read_text()
    assert text.count("IR of") - text.count("interrupted: resumes at") == 1
    assert text.count("complete at sequence") == 1

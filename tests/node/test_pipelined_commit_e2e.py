"""The pipelined commit end to end (issue 16 item 2): the recovery server acknowledges a
batch once its journal is durable and applies it after; the apply is held back here (a
fault hook blocks the undo capture), so the primary's cycle is seen to end before it,
and the files as a crash would leave them at that instant recover to the batch."""

from __future__ import annotations

import random
import shutil
import threading
import uuid
from pathlib import Path

import trio

from node.config import load_recovery_server_config
from node.primary.verify import VerifyResult
from node.recovery_server import RecoveryServer
from node.storage import ReplicaStore, StorageFaults
from node.storage.layout import ReplicaLayout

from .site import Site
from .test_replication_e2e import MIB, make_image, scribble


async def test_the_ack_comes_before_the_apply_and_a_crash_between_loses_nothing(
    site: Site, tmp_path: Path
) -> None:
    hold = {"on": False}
    undo_started = threading.Event()
    release = threading.Event()

    def before_write(path: Path, nbytes: int) -> None:
        if hold["on"] and path.name.endswith(".undo"):
            undo_started.set()
            release.wait(30)  # the apply's worker thread waits here; the Ack is gone

    config = load_recovery_server_config(site.server_config)
    server = RecoveryServer(config, faults=StorageFaults(before_write=before_write))
    rng = random.Random(41)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    lo = ReplicaLayout(site.storage, vmid)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(server.serve)
                port = listeners[0].socket.getsockname()[1]
                replicator = site.replicator(vmid, "vm", [image], port)
                await replicator.cycle()  # IR
                before = site.replica_image(vmid, 0).read_bytes()
                scribble(image, rng, writes=5)
                hold["on"] = True
                await replicator.cycle()  # returns at the Ack
                assert replicator.state.sequence == 1
                assert replicator.pending.cycles() == []
                at_1 = image.read_bytes()
                # The apply has begun and is held: the images are untouched, the state
                # says the IR, the committed journal is there.
                assert await trio.to_thread.run_sync(undo_started.wait, 10)
                assert site.replica_image(vmid, 0, applied=False).read_bytes() == before
                assert [p.name for p in lo.journal_dir.iterdir()] == [f"{1:020d}.jrnl"]
                # The disk as a crash at this instant leaves it.
                crashed = tmp_path / "crashed"
                shutil.copytree(site.storage, crashed, symlinks=True)
                # A reader meanwhile (a verification's digest maps) waits for the apply,
                # so it sees the batch whole.
                results: list[VerifyResult] = []

                async def verify() -> None:
                    results.append(await replicator.verify())

                nursery.start_soon(verify)
                await trio.sleep(0.3)
                assert results == []  # still waiting for the apply
                release.set()
                while not results:
                    await trio.sleep(0.05)
                assert results[0].ok
                assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
                # A maintenance task (a cluster's move) that takes the VM once its session
                # ended waits for the apply too, before it reads the files itself.
                undo_started.clear()
                release.clear()
                scribble(image, rng, writes=5)
                await replicator.cycle()
                assert await trio.to_thread.run_sync(undo_started.wait, 10)
                assert server.hold(vmid)  # the session let the VM go: no BUSY for the next
                settled: list[bool] = []

                async def settle() -> None:
                    await server.settle(vmid)
                    settled.append(True)

                nursery.start_soon(settle)
                await trio.sleep(0.3)
                assert settled == []
                release.set()
                while not settled:
                    await trio.sleep(0.05)
                assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
                server.release(vmid)
                nursery.cancel_scope.cancel()
    finally:
        release.set()
    with ReplicaStore(crashed, keep_points=4) as store:
        log = store.recover()
        assert any("re-applied committed batch 1" in line for line in log), log
        replica = store.open(vmid)
        assert replica.applied_sequence == 1
        assert replica.image_path(0).read_bytes() == at_1

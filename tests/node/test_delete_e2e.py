"""RelationshipDelete against a stand-alone recovery server: the primary ends a
relationship and the replica is removed (images, journal, recovery points), with no
tombstone, so the VM is unknown afterwards and may be seeded again."""

from __future__ import annotations

import errno
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.server import ServerProcess
from node.config import load_recovery_server_config
from node.primary.client import RecoveryClient
from node.recovery_server import RecoveryServer
from node.storage import StorageFaults
from node.storage.layout import TRASH_DIR, ReplicaLayout, tombstone_path

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site
from .test_replication_e2e import make_image, scribble

MIB = 1024 * 1024


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


async def _connect(site: Site, port: int) -> RecoveryClient:
    return await RecoveryClient.connect(
        SERVER_HOST,
        port,
        server_name=SERVER_NAME,
        ssl_context=site.client_context(),
        local_address=PRIMARY_HOST,
    )


def _disks(images: list[Path]) -> tuple[fp.DiskInfo, ...]:
    return tuple(fp.DiskInfo(f"disk{i}", p.stat().st_size) for i, p in enumerate(images))


async def _seed(client: RecoveryClient, vmid: uuid.UUID, images: list[Path]) -> None:
    """Create the relationship and send the IR (sequence 0)."""
    accepted = await client.open(vmid, name="doomed", disks=_disks(images), create=True)
    assert accepted.ir_state is fp.IRState.NOT_STARTED
    await client.send_ir(vmid, images)


async def test_delete_removes_the_replica_and_the_vm_may_be_seeded_again(
    site: Site, server: ServerProcess
) -> None:
    rng = random.Random(31)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    keep = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = [make_image(site.root / f"disk{i}.img", MIB + i * 4096, rng) for i in range(2)]
    other = [make_image(site.root / "other.img", MIB, rng)]
    layout = ReplicaLayout(site.storage, vmid)
    with trio.fail_after(60):
        client = await _connect(site, server.port)
        try:
            await _seed(client, keep, other)  # a second VM, which must stay as it is
            await _seed(client, vmid, images)
            assert layout.dir.is_dir()
            assert site.replica_image(vmid, 1).read_bytes() == images[1].read_bytes()

            await client.delete_relationship(vmid)

            # Gone whole (images, journal, points, state), without a tombstone, and
            # nothing left in the trash.
            assert not layout.dir.exists()
            assert not tombstone_path(site.storage, vmid).exists()
            assert list((site.storage / TRASH_DIR).iterdir()) == []
            assert site.replica_image(keep, 0).read_bytes() == other[0].read_bytes()
            assert server.wait_for_log(f"removed replica {vmid}")
            # No relationship is open now, and none exists for the VM here.
            assert client.conn.connection.state is fp.State.READY
            with pytest.raises(fp.UnknownVM):
                await client.open(vmid, name="doomed", disks=(), create=False)
            # A RelationshipCreate seeds it again, from nothing (a full IR).
            for image in images:
                scribble(image, rng, writes=4)
            accepted = await client.open(vmid, name="reborn", disks=_disks(images))
            assert accepted.ir_state is fp.IRState.NOT_STARTED
            assert accepted.applied_sequence == 0
            await client.send_ir(vmid, images)
            for index, image in enumerate(images):
                assert site.replica_image(vmid, index).read_bytes() == image.read_bytes()
        finally:
            await client.aclose()
        # The deleted VM was let go (no BUSY): another connection opens the new replica.
        second = await _connect(site, server.port)
        try:
            accepted = await second.open(vmid, name="reborn", disks=(), create=False)
            assert accepted.ir_state is fp.IRState.COMPLETE
            await second.delete_relationship(vmid)
            assert not layout.dir.exists()
        finally:
            await second.aclose()


async def test_a_failed_delete_is_refused_and_the_relationship_goes_on(site: Site) -> None:
    """Removing the replica fails (a fault hook on the rename into the trash): INTERNAL, a
    refusal; the replica is whole and the relationship usable, and a new try succeeds."""
    failing = {"on": False}

    def before_sync(path: Path) -> None:
        if failing["on"] and path.parent.name == TRASH_DIR:
            raise OSError(errno.EIO, "Input/output error", str(path))

    config = load_recovery_server_config(site.server_config)
    server = RecoveryServer(config, faults=StorageFaults(before_sync=before_sync))
    rng = random.Random(37)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = [make_image(site.root / "disk0.img", MIB, rng)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            client = await _connect(site, listeners[0].socket.getsockname()[1])
            try:
                await _seed(client, vmid, images)
                failing["on"] = True
                # INTERNAL with an incident id: the system's words and the path of the
                # replica are in the server's log, not in the Error (ERR-11, ERR-12).
                with pytest.raises(fp.InternalError, match=r"incident [0-9a-f]{8}") as refused:
                    await client.delete_relationship(vmid)
                assert "Input/output" not in refused.value.message
                assert str(site.root) not in refused.value.message
                failing["on"] = False
                conn = client.conn.connection
                assert conn.state is fp.State.SESSION
                assert conn.vmid == vmid
                assert site.replica_image(vmid, 0).read_bytes() == images[0].read_bytes()
                # The relationship goes on with the replica opened again: a digest map
                # of what it holds, and a batch.
                dmap = await client.digest_map(vmid, 0, 65536, 0, 16)
                assert dmap.digest(0) == fp.codec.chunk_digest(images[0].read_bytes()[:65536])
                data = b"after the failed delete" * 100
                chunk = (0, 4096, data, fp.codec.chunk_digest(data))
                await client.send_batch(
                    vmid, 1, [chunk], chunk_count=1, total_bytes=len(data), captured_at_ms=0
                )
                await client.delete_relationship(vmid)
                assert not ReplicaLayout(site.storage, vmid).dir.exists()
            finally:
                await client.aclose()
            nursery.cancel_scope.cancel()

"""Protocol 1.1 against 1.0 peers, both ways: a connection at 1.0 carries the whole 1.0
conversation (RelationshipDelete with its tag of before 1.1, NEG-15), and the 1.1
planned failover is not offered on it (NEG-13, NEG-14)."""

from __future__ import annotations

import dataclasses
import random
import uuid

import pytest
import trio

import frproto as fp
from node.config import load_recovery_server_config
from node.primary.client import RecoveryClient
from node.recovery_server import RecoveryServer
from node.storage.layout import ReplicaLayout

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site

MIB = 1024 * 1024


async def test_a_1_0_primary_is_served_by_a_1_1_server(site: Site) -> None:
    """A primary that speaks 1.0 only (a real server process at 1.1): replication, and a
    RelationshipDelete sent as 0x0013, work; a failover request is not sent at 1.0."""
    rng = random.Random(11)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(MIB))
    server = site.start_server()
    try:
        with trio.fail_after(60):
            client = await RecoveryClient.connect(
                SERVER_HOST,
                server.port,
                server_name=SERVER_NAME,
                ssl_context=site.client_context(),
                local_address=PRIMARY_HOST,
                version=(1, 0),
            )
            try:
                assert client.negotiated.version == (1, 0)
                disks = (fp.DiskInfo("disk0", MIB),)
                await client.open(vmid, name="old", disks=disks, create=True)
                await client.send_ir(vmid, [image])
                assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
                request = fp.FailoverRequest(vmid, 0, 65536, bytes(16))
                with pytest.raises(fp.NotSupported):
                    await client.fail_over(request)
                with pytest.raises(fp.LocalProtocolError):  # NEG-13, even if asked to
                    await client.conn.send(request)
                await client.delete_relationship(vmid)  # as 0x0013 (NEG-15)
                assert not ReplicaLayout(site.storage, vmid).dir.exists()
            finally:
                await client.aclose()
    finally:
        server.stop()


async def test_a_1_1_primary_against_a_1_0_server(site: Site) -> None:
    """A recovery server that speaks 1.0 only: the 1.1 primary replicates at 1.0; its
    planned failover is refused before anything is asked (the replica stays as it is)
    and its delete goes as 0x0013."""
    rng = random.Random(12)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(MIB))
    config = load_recovery_server_config(site.server_config)
    server = RecoveryServer(config)
    # What a server of before 1.1 answers: its own minor version, 0.
    server._policy = dataclasses.replace(server._policy, version=(1, 0))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]
            vm = site.replicator(vmid, "new", [image], port)
            await vm.cycle()
            assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
            with pytest.raises(fp.NotSupported):
                await vm.hand_over()
            assert vm.state.halted is None  # nothing switched: it replicates on
            replica = server._stores[config.storages[0].resolve()].open(vmid)
            assert not replica.failed_over
            assert replica.generation == 1
            await vm.reseed()  # RelationshipDelete, as 0x0013 at 1.0
            assert not ReplicaLayout(site.storage, vmid).dir.exists()
            nursery.cancel_scope.cancel()

"""What a relationship's refusals and answers say, against an in-process recovery server:
a disk too large is NO_SPACE (REP-23); an Error carries no local path and a failure of
the server's own is INTERNAL with an incident id (ERR-11, ERR-12), the connection going
on; a resent create keeps the new name and blob (REP-28); IR progress is kept when the
connection ends (REP-27)."""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import frproto as fp
from node.config import load_recovery_server_config
from node.primary.client import RecoveryClient
from node.recovery_server import RecoveryServer
from node.storage import ReplicaStore, StorageFaults

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site

MIB = 1 << 20
DISKS = (fp.DiskInfo("disk0", 4 * MIB), fp.DiskInfo("disk1", 2 * MIB))
INCIDENT = re.compile(r"incident ([0-9a-f]{8})")


@asynccontextmanager
async def _served(
    site: Site, faults: StorageFaults | None = None
) -> AsyncIterator[tuple[RecoveryServer, Callable[[], RecoveryClient]]]:
    config = load_recovery_server_config(site.server_config)
    server = RecoveryServer(config, faults=faults)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]

            async def connect() -> RecoveryClient:
                return await RecoveryClient.connect(
                    SERVER_HOST,
                    port,
                    server_name=SERVER_NAME,
                    ssl_context=site.client_context(),
                    local_address=PRIMARY_HOST,
                )

            yield server, connect  # type: ignore[misc]
            nursery.cancel_scope.cancel()


async def test_a_disk_too_large_is_no_space_and_the_connection_goes_on(site: Site) -> None:
    huge = (fp.DiskInfo("disk0", 1 << 50),)
    async with _served(site) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            with pytest.raises(fp.NoSpace) as refused:
                await client.open(uuid.uuid4(), name="big", disks=huge)
            text = refused.value.message
            assert str(1 << 50) in text
            assert "cannot be held" in text
            assert "'disk0'" in text
            assert "/" not in text
            # The connection goes on: a VM of an ordinary size is created on it.
            accepted = await client.open(uuid.uuid4(), name="vm", disks=DISKS)
            assert accepted.disks == DISKS
        finally:
            await client.aclose()
    assert list((site.storage / ".staging").iterdir()) == []


def test_a_disk_past_the_largest_file_is_no_space(tmp_path: Path) -> None:
    """A disk the file system is big enough for but cannot make a file of (EFBIG when the
    image is sized) is NO_SPACE too, and nothing is left behind."""

    def before_write(path: Path, nbytes: int) -> None:
        if path.suffix == ".img":
            raise OSError(errno.EFBIG, "File too large", str(path))

    with ReplicaStore(tmp_path / "s", faults=StorageFaults(before_write=before_write)) as store:
        vmid = uuid.uuid4()
        with pytest.raises(fp.NoSpace, match="of 4194304 bytes cannot be held") as refused:
            store.create(vmid, name="vm", config=b"", disks=DISKS, primary="p", trust_group="g")
        assert "/" not in refused.value.message
        assert not store.exists(vmid)
        assert list((store.root / ".staging").iterdir()) == []


async def test_a_storage_failure_is_internal_with_an_incident_id(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    failing = {"on": True}

    def before_write(path: Path, nbytes: int) -> None:
        if failing["on"] and path.name.startswith("config"):
            raise OSError(errno.EIO, "Input/output error", str(path))

    caplog.set_level(logging.ERROR, logger="frrep.recovery")
    async with _served(site, StorageFaults(before_write=before_write)) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            with pytest.raises(fp.InternalError) as refused:
                await client.open(uuid.uuid4(), name="vm", disks=DISKS)
            text = refused.value.message
            assert str(site.root) not in text
            assert "/" not in text
            assert "Input/output" not in text
            found = INCIDENT.search(text)
            assert found, text
            logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
            assert logged
            assert str(site.storage) in logged[0].getMessage()
            failing["on"] = False
            # A refusal (ERR-12): the next request on the connection is answered.
            accepted = await client.open(uuid.uuid4(), name="vm", disks=DISKS)
            assert accepted.ir_state is fp.IRState.NOT_STARTED
        finally:
            await client.aclose()


async def test_an_unexpected_exception_is_internal_and_the_connection_goes_on(
    site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = ReplicaStore.create
    calls = {"n": 0}

    def create(self: ReplicaStore, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"a bug near {self.root}")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ReplicaStore, "create", create)
    caplog.set_level(logging.ERROR, logger="frrep.recovery")
    async with _served(site) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            with pytest.raises(fp.InternalError) as refused:
                await client.open(uuid.uuid4(), name="vm", disks=DISKS)
            text = refused.value.message
            assert "bug" not in text
            assert "RuntimeError" not in text
            assert "/" not in text
            found = INCIDENT.search(text)
            assert found, text
            record = next(r for r in caplog.records if found.group(1) in r.getMessage())
            assert record.exc_info is not None  # the traceback is in the log
            accepted = await client.open(uuid.uuid4(), name="vm", disks=DISKS)
            assert accepted.disks == DISKS
        finally:
            await client.aclose()


async def test_a_resent_create_keeps_the_new_name_and_config_blob(site: Site) -> None:
    vmid = uuid.uuid4()
    async with _served(site) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            first = await client.open(vmid, name="web-01", disks=DISKS, config=b"v1")
            again = await client.open(vmid, name="web-01-renamed", disks=DISKS, config=b"v2")
            assert (again.generation, again.disks) == (first.generation, first.disks)
            # Other disks are still EXISTS, and change nothing.
            with pytest.raises(fp.AlreadyExists):
                await client.open(vmid, name="other", disks=DISKS[:1], config=b"v3")
        finally:
            await client.aclose()
    with ReplicaStore(site.storage) as store:  # what is durable
        replica = store.open(vmid)
        assert replica.name == "web-01-renamed"
        assert replica.config_blob() == b"v2"


async def test_a_lost_connection_keeps_the_ir_received_so_far(site: Site) -> None:
    """The resume point is where the data received in order ends: a chunk after a gap
    does not move it, and nothing received before the cut is asked again."""
    vmid = uuid.uuid4()
    data = os.urandom(MIB)
    async with _served(site) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            await client.open(vmid, name="vm", disks=DISKS)
            await client.conn.send(fp.IRBegin(vmid, 0))
            for offset in (0, MIB, 2 * MIB):
                await client.conn.send_chunk(0, offset, data)
            await client.conn.send_chunk(1, MIB, data)  # after a gap: disk 0's last MiB
        finally:
            await client.aclose()
        with trio.fail_after(20):
            while True:
                again = await connect()  # type: ignore[misc]
                try:
                    accepted = await again.open(vmid, name="vm", disks=DISKS, create=False)
                    break
                except fp.Busy:
                    await trio.sleep(0.05)  # the server has not seen the cut yet
                finally:
                    await again.aclose()
    assert accepted.ir_state is fp.IRState.IN_PROGRESS
    assert (accepted.resume_disk, accepted.resume_offset) == (0, 3 * MIB)


async def test_the_resume_point_moves_to_the_next_disk(site: Site) -> None:
    vmid = uuid.uuid4()
    zero = fp.codec.zero_digest(MIB)
    async with _served(site) as (_server, connect):
        client = await connect()  # type: ignore[misc]
        try:
            await client.open(vmid, name="vm", disks=DISKS)
            await client.conn.send(fp.IRBegin(vmid, 0))
            for offset in range(0, 4 * MIB, MIB):  # all of disk 0, then disk 1's first MiB
                await client.conn.send_chunk(0, offset, bytes(MIB), digest=zero)
            await client.conn.send_chunk(1, 0, bytes(MIB), digest=zero)
        finally:
            await client.aclose()
        with trio.fail_after(20):
            while True:
                again = await connect()  # type: ignore[misc]
                try:
                    accepted = await again.open(vmid, name="vm", disks=DISKS, create=False)
                    break
                except fp.Busy:
                    await trio.sleep(0.05)
                finally:
                    await again.aclose()
    assert (accepted.resume_disk, accepted.resume_offset) == (1, MIB)

"""What a real recovery server makes of an IR that does not cover its disks (REP-32),
starts past its resume point (REP-31) or comes for a complete replica (REP-30), and of
overlapping chunks (CHK-25): each refusal comes at the IREnd and leaves the connection
usable and the replica as the rules say."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator

import pytest
import trio

import frproto as fp
from frtesting.server import ServerProcess
from node.primary.client import RecoveryClient

from .site import PRIMARY_HOST, SERVER_HOST, SERVER_NAME, Site

KIB = 1024
DISKS = (fp.DiskInfo("disk0", 512 * KIB), fp.DiskInfo("disk1", 64 * KIB + 4096))
STEP = 64 * KIB


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


async def _connect(site: Site, server: ServerProcess) -> RecoveryClient:
    return await RecoveryClient.connect(
        SERVER_HOST,
        server.port,
        server_name=SERVER_NAME,
        ssl_context=site.client_context(),
        local_address=PRIMARY_HOST,
    )


def _images(rng: random.Random) -> list[bytearray]:
    return [bytearray(rng.randbytes(d.size)) for d in DISKS]


async def _send_ir(
    client: RecoveryClient,
    vmid: uuid.UUID,
    images: list[bytearray],
    start: tuple[int, int] = (0, 0),
    skip: tuple[int, int] | None = None,
) -> None:
    """IRBegin at ``start``, the images from there in STEP chunks (but ``skip``), IREnd."""
    await client.conn.send(fp.IRBegin(vmid, 0, start[0], start[1]))
    for disk, image in enumerate(images):
        for offset in range(0, len(image), STEP):
            if (disk, offset) < (start[0], start[1] - start[1] % STEP) or (disk, offset) == skip:
                continue
            await client.conn.send_chunk(disk, offset, bytes(image[offset : offset + STEP]))
    await client.conn.end_ir()


def _replica(site: Site, vmid: uuid.UUID) -> list[bytes]:
    return [site.replica_image(vmid, i).read_bytes() for i in range(len(DISKS))]


async def test_an_ir_that_covers_nothing_is_refused(site: Site, server: ServerProcess) -> None:
    rng = random.Random(1)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = _images(rng)
    client = await _connect(site, server)
    try:
        with trio.fail_after(30):
            await client.open(vmid, name="vm", disks=DISKS, create=True)
            # Past the last disk, no chunk: before, this was "complete" (all zeros).
            await client.conn.send(fp.IRBegin(vmid, 0, len(DISKS), 0))
            await client.conn.end_ir()
            with pytest.raises(fp.OutOfSequence, match="past its resume point"):
                await client.conn.expect(fp.Ack)
            # A refusal: the same connection goes on.
            again = await client.open(vmid, name="vm", disks=DISKS, create=False)
            assert again.ir_state is not fp.IRState.COMPLETE
            assert (again.resume_disk, again.resume_offset) == (0, 0)
            await _send_ir(client, vmid, images)
            ack = await client.conn.expect(fp.Ack)
            assert isinstance(ack, fp.Ack)
            assert ack.kind is fp.AckKind.IR_COMPLETE
    finally:
        await client.aclose()
    assert _replica(site, vmid) == [bytes(i) for i in images]


async def test_an_ir_with_a_gap_is_refused_and_resumes_at_the_gap(
    site: Site, server: ServerProcess
) -> None:
    rng = random.Random(2)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = _images(rng)
    gap = (0, 3 * STEP)
    client = await _connect(site, server)
    try:
        with trio.fail_after(30):
            await client.open(vmid, name="vm", disks=DISKS, create=True)
            await _send_ir(client, vmid, images, skip=gap)
            with pytest.raises(fp.OutOfSequence, match="did not cover"):
                await client.conn.expect(fp.Ack)
            again = await client.open(vmid, name="vm", disks=DISKS, create=False)
            assert again.ir_state is fp.IRState.IN_PROGRESS
            assert (again.resume_disk, again.resume_offset) == gap
            # Past the resume point: refused too, at the IREnd, and nothing moves.
            await _send_ir(client, vmid, images, start=(0, 4 * STEP))
            with pytest.raises(fp.OutOfSequence, match="past its resume point"):
                await client.conn.expect(fp.Ack)
            again = await client.open(vmid, name="vm", disks=DISKS, create=False)
            assert (again.resume_disk, again.resume_offset) == gap
            # From the resume point: complete.
            await _send_ir(client, vmid, images, start=gap)
            ack = await client.conn.expect(fp.Ack)
            assert isinstance(ack, fp.Ack)
            assert ack.kind is fp.AckKind.IR_COMPLETE
    finally:
        await client.aclose()
    assert _replica(site, vmid) == [bytes(i) for i in images]


async def test_an_ir_for_a_complete_replica_is_refused_at_its_end(
    site: Site, server: ServerProcess
) -> None:
    rng = random.Random(3)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = _images(rng)
    client = await _connect(site, server)
    try:
        with trio.fail_after(30):
            await client.open(vmid, name="vm", disks=DISKS, create=True)
            await _send_ir(client, vmid, images)
            await client.conn.expect(fp.Ack)
            other = _images(rng)
            await client.conn.send(fp.IRBegin(vmid, 0))
            await client.conn.send_chunk(0, 0, bytes(other[0][:STEP]))
            with trio.move_on_after(0.5):
                early = await client.conn.next_event()
                pytest.fail(f"{early} before the IREnd")
            await client.conn.end_ir()
            with pytest.raises(fp.AlreadyExists):
                await client.conn.expect(fp.Ack)
            # The connection goes on.
            await client.conn.send(fp.DigestMapRequest(vmid, 0, STEP, 0, 1))
            answer = await client.conn.expect(fp.DigestMap)
            assert isinstance(answer, fp.DigestMap)
            assert answer.digests == fp.codec.chunk_digest(bytes(images[0][:STEP]))
    finally:
        await client.aclose()
    assert _replica(site, vmid) == [bytes(i) for i in images]


async def test_overlapping_chunks_the_later_one_wins(site: Site, server: ServerProcess) -> None:
    rng = random.Random(4)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    model = [bytearray(d.size) for d in DISKS]
    client = await _connect(site, server)

    async def chunk(disk: int, offset: int, data: bytes) -> None:
        # All-zero data goes as a ZERO chunk (send_chunk sees it).
        await client.conn.send_chunk(disk, offset, data)
        model[disk][offset : offset + len(data)] = data

    try:
        with trio.fail_after(60):
            await client.open(vmid, name="vm", disks=DISKS, create=True)
            # An IR in a fresh replica (zero chunks are not written there unless they
            # overlap an earlier chunk), in an order that overlaps in every way.
            await client.conn.send(fp.IRBegin(vmid, 0))
            for disk, size in enumerate(d.size for d in DISKS):
                for offset in range(0, size, STEP):
                    await chunk(disk, offset, rng.randbytes(min(STEP, size - offset)))
            for _ in range(60):
                disk = rng.randrange(len(DISKS))
                offset = rng.randrange(DISKS[disk].size)
                length = rng.randint(1, min(2 * STEP, DISKS[disk].size - offset))
                data = bytes(length) if rng.random() < 0.4 else rng.randbytes(length)
                await chunk(disk, offset, data)
            await client.conn.end_ir()
            await client.conn.expect(fp.Ack)
            assert _replica(site, vmid) == [bytes(m) for m in model]
            # A batch: the same.
            count = 30
            await client.conn.send(fp.BatchBegin(vmid, 1, 0, count))
            for _ in range(count):
                disk = rng.randrange(len(DISKS))
                offset = rng.randrange(0, DISKS[disk].size // 2)
                length = rng.randint(1, min(STEP, DISKS[disk].size - offset))
                data = bytes(length) if rng.random() < 0.3 else rng.randbytes(length)
                await chunk(disk, offset, data)
            await client.conn.end_batch()
            await client.conn.expect(fp.Ack)
    finally:
        await client.aclose()
    assert _replica(site, vmid) == [bytes(m) for m in model]

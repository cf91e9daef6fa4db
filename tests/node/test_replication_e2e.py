"""Stand-alone replication end to end: a real recovery server process, mutual TLS on
loopback, real image files, several VMs and cycles of random writes."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from frtesting.server import ServerProcess
from node.primary.state import IRStage

from .site import Site

MIB = 1024 * 1024


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


def make_image(path: Path, size: int, rng: random.Random) -> Path:
    """An image with random data, a zero region and a text-like region."""
    data = bytearray(rng.randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 4)
    data[size // 2 : size // 2 + size // 8] = (b"log line %d\n" * 1)[:12] * (size // 96)
    path.write_bytes(data[:size])
    return path


def scribble(path: Path, rng: random.Random, writes: int) -> None:
    """Random writes (some of zeros) anywhere in the image, as a running VM would."""
    size = path.stat().st_size
    with path.open("r+b") as image:
        for _ in range(writes):
            length = rng.choice([512, 4096, 65536, 200_000])
            offset = rng.randrange(0, size - length)
            image.seek(offset)
            image.write(bytes(length) if rng.random() < 0.2 else rng.randbytes(length))


async def test_several_vms_replicate_cycle_by_cycle(site: Site, server: ServerProcess) -> None:
    rng = random.Random(7)
    vms = []
    for n in range(3):
        vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
        images = [
            make_image(site.root / f"vm{n}-disk{i}.img", size, rng)
            for i, size in enumerate([4 * MIB, 3 * MIB + 12345])
        ]
        vms.append((vmid, images, site.replicator(vmid, f"vm{n}", images, server.port)))
    with trio.fail_after(120):
        for cycle in range(4):
            for vmid, images, replicator in vms:
                if cycle:
                    for image in images:
                        scribble(image, rng, writes=6)
                await replicator.cycle()
                # After each ack the replica equals the primary as of that cycle.
                for index, image in enumerate(images):
                    replica = site.replica_image(vmid, index)
                    assert replica.read_bytes() == image.read_bytes(), (cycle, vmid, index)
                assert replicator.state.ir_state == "COMPLETE"
                assert replicator.state.sequence == max(0, cycle)
                assert replicator.pending.cycles() == []
    # A replica is sparse where the primary had zeros (IR never wrote them).
    replica = site.replica_image(vms[0][0], 0)
    assert replica.stat().st_blocks * 512 < replica.stat().st_size


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (fp.CompressionSet(0), fp.Compression.NONE),
        (fp.CompressionSet.ZSTD, fp.Compression.ZSTD),
        (fp.CompressionSet.LZ4, fp.Compression.LZ4),
    ],
)
async def test_compression_as_negotiated(
    site: Site, server: ServerProcess, offered: fp.CompressionSet, expected: fp.Compression
) -> None:
    """Text-like disks go compressed when compression is offered; the replica is exact."""
    rng = random.Random(11)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    text = b"".join(b"%08d GET /index.html 200 OK\n" % i for i in range(2 * MIB // 32 + 1))
    image = site.root / "text.img"
    image.write_bytes(text[: 2 * MIB] + text[: 2 * MIB])
    replicator = site.replicator(vmid, "texty", [image], server.port)
    replicator.compression = offered
    with trio.fail_after(60):
        await replicator.cycle()  # IR
        assert replicator.last_compression is expected
        ir_sent = replicator.last_chunk_bytes_sent
        scribble_text = text[: 5 * 65536]
        with image.open("r+b") as f:
            f.seek(MIB)
            f.write(scribble_text)
        await replicator.cycle()  # one batch
        batch_sent = replicator.last_chunk_bytes_sent
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    if expected is fp.Compression.NONE:
        assert ir_sent >= 4 * MIB
        assert batch_sent >= len(scribble_text)
    else:  # log-like text compresses several times over with either method
        assert ir_sent < MIB
        assert batch_sent < len(scribble_text) // 2


async def test_a_vms_own_compression_is_offered_over_the_configs(
    site: Site, server: ServerProcess
) -> None:
    """``frctl replication set --compression`` (operations.set_limits): the VM offers its
    own methods from its next connection; ``default`` gives it the config's again."""
    from node.primary.operations import set_limits
    from node.primary.replicator import VMReplicator

    def _negotiated(replicator: VMReplicator) -> fp.Compression:
        return replicator.last_compression  # read anew each time (mypy narrows attributes)

    vmid = uuid.UUID(bytes=random.Random(12).randbytes(16), version=4)
    image = site.root / "lz.img"
    image.write_bytes(b"%08d GET / 200\n" % 1 * (MIB // 16))
    replicator = site.replicator(vmid, "lz", [image], server.port)
    replicator.compression = fp.CompressionSet.ZSTD  # as the primary's config offers
    with trio.fail_after(60):
        await replicator.cycle()
        assert _negotiated(replicator) is fp.Compression.ZSTD
        state = set_limits(replicator.store, replicator.state, compression="lz4")
        assert state.compression == "lz4"
        replicator.state.compression = state.compression  # as the service's next turn reads
        await replicator.cycle()
        assert _negotiated(replicator) is fp.Compression.LZ4
        state = set_limits(replicator.store, replicator.state, compression="default")
        assert state.compression is None
        replicator.state.compression = None
        await replicator.cycle()
        assert _negotiated(replicator) is fp.Compression.ZSTD


async def test_primary_restart_resumes_without_new_ir(site: Site, server: ServerProcess) -> None:
    rng = random.Random(11)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await first.cycle()
        scribble(image, rng, writes=5)
        await first.cycle()
        # A new replicator from the persisted state: as after a primary restart.
        again = site.restarted(first)
        assert again.state.ir_state == "COMPLETE"
        assert again.state.sequence == 1
        scribble(image, rng, writes=5)
        ir_bytes_before = _ir_bytes(server)
        await again.cycle()
    assert again.state.sequence == 2
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    assert _ir_bytes(server) == ir_bytes_before  # no IR was repeated


def _ir_bytes(server: ServerProcess) -> int:
    return server.log.read_text().count("IR of ")


async def test_unreachable_server_keeps_changes_in_the_pending_log(site: Site) -> None:
    rng = random.Random(3)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    server = site.start_server()
    replicator = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await replicator.cycle()
        server.stop()
        for _ in range(2):
            scribble(image, rng, writes=4)
            with pytest.raises(OSError, match=r"connecting to r1\.example\.com"):
                await replicator.cycle()
        # Two captured cycles wait on disk, not in memory.
        assert [c.sequence for c in replicator.pending.cycles()] == [1, 2]
        assert replicator.pending.size_bytes > 0
        server = site.start_server(port=server.port)
        try:
            await replicator.cycle()
        finally:
            server.stop()
    # Both captured cycles went as batches 1 and 2; the reconnecting cycle found nothing
    # new to capture (the digest maps follow what was captured, not only what was acked).
    assert replicator.state.sequence == 2
    assert replicator.pending.cycles() == []
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_bandwidth_limit_of_a_relationship_holds(site: Site, server: ServerProcess) -> None:
    """A VM limited to 1 MB/s needs at least ~2 s for 3 MB of random data (the first
    second is the bucket's burst). Only a lower bound: a limiter may never be faster."""
    rng = random.Random(17)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(3 * MIB))
    replicator = site.replicator(vmid, "vm", [image], server.port)
    replicator.state.bandwidth_bps = 1_000_000
    with trio.fail_after(60):
        started = trio.current_time()
        await replicator.cycle()
        elapsed = trio.current_time() - started
    assert elapsed >= 1.8, f"3 MiB at 1 MB/s took only {elapsed:.2f} s"
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


def test_rates_parse() -> None:
    from frlink.config import parse_rate

    assert parse_rate("200M") == 200e6
    assert parse_rate("1.5G") == 1.5e9
    assert parse_rate("500k") == 500e3
    assert parse_rate(1000) == 1000
    with pytest.raises(ValueError, match="positive"):
        parse_rate("0")


def test_compression_setting_parses() -> None:
    from frlink.config import ConfigError, parse_compression

    assert parse_compression("none") == fp.CompressionSet(0)
    assert parse_compression("zstd") == fp.CompressionSet.ZSTD
    assert parse_compression("LZ4, zstd") == fp.CompressionSet.ZSTD | fp.CompressionSet.LZ4
    with pytest.raises(ConfigError, match="'gzip' is not zstd"):
        parse_compression("gzip")


async def test_an_ir_whose_ack_was_lost_takes_its_map_from_the_replica(
    site: Site, server: ServerProcess
) -> None:
    # The primary was killed after the server completed the IR, before it recorded the
    # ack; meanwhile the VM wrote. The next cycle must learn what the replica holds (its
    # digests), not digest the changed images: those writes must still be sent.
    rng = random.Random(12)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await first.cycle()
        state = first.store.load(str(vmid))
        state.ir_state = IRStage.IN_PROGRESS  # as if the ack had not been recorded
        first.store.save(state)
        scribble(image, rng, writes=6)
        again = site.restarted(first)
        await again.cycle()  # finds the IR complete at the server: no data sent
        assert again.state.ir_state == "COMPLETE"
        assert site.replica_image(vmid, 0).read_bytes() != image.read_bytes()
        await again.cycle()  # the scan sends what changed since the IR
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_a_cycle_acknowledged_but_not_yet_dropped_is_not_sent_again(
    site: Site, server: ServerProcess
) -> None:
    # The primary is killed after recording batch 1's ack, before dropping it from its
    # pending log. Restarted, it must drop that cycle unsent and number the next changes
    # 2: numbered 1 again, the replica would acknowledge them without applying them.
    rng = random.Random(13)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await first.cycle()  # IR
        scribble(image, rng, writes=5)
        first.pending.drop_through = lambda sequence: None  # type: ignore[method-assign]
        await first.cycle()  # batch 1: acknowledged and recorded, still in the log
        assert first.state.sequence == 1
        assert [c.sequence for c in first.pending.cycles()] == [1]
        again = site.restarted(first)
        scribble(image, rng, writes=5)
        await again.cycle()
    assert again.state.sequence == 2
    assert not again.pending.cycles()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_a_primary_killed_before_recording_an_ack_never_reuses_its_sequence(
    site: Site, server: ServerProcess
) -> None:
    # Killed (here: its state write fails) right after batch 1 was acknowledged, before
    # the ack is recorded. Restarted, it must not number new changes 1: the replica holds
    # batch 1 and would acknowledge a different batch 1 without applying it.
    rng = random.Random(14)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
    store = first.store
    real_save = store.save_progress

    def save_then_die(state: Any, seen: Any = None) -> Any:
        if state.sequence == 1:
            raise OSError("killed before the ack was recorded")
        return real_save(state, seen)

    with trio.fail_after(60):
        await first.cycle()  # IR
        scribble(image, rng, writes=5)
        store.save_progress = save_then_die  # type: ignore[method-assign]
        with pytest.raises(OSError, match="killed"):
            await first.cycle()  # batch 1 applied by the server, ack not recorded
        store.save_progress = real_save  # type: ignore[method-assign]
        again = site.restarted(first)
        assert again.state.sequence == 0
        scribble(image, rng, writes=5)
        await again.cycle()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()


async def test_a_resent_sequence_with_other_content_is_refused(
    site: Site, server: ServerProcess
) -> None:
    # Defence in depth for the bug above: the replica keeps each kept point's aggregate
    # digest; the same batch again is acknowledged, other content under an applied
    # sequence is refused with OUT_OF_SEQUENCE instead of silently acknowledged.
    import xxhash

    from node.primary.client import RecoveryClient

    rng = random.Random(15)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    first = site.replicator(vmid, "vm", [image], server.port)
    with trio.fail_after(60):
        await first.cycle()  # IR

        async def send(data: bytes) -> None:
            client = await RecoveryClient.connect(
                "127.0.0.2",
                server.port,
                server_name="r1.example.com",
                ssl_context=site.client_context(),
                local_address=first.local_address,
            )
            try:
                await client.open(vmid, name="vm", disks=first.disks, create=False)
                chunk = (0, 65536, data, xxhash.xxh3_128_digest(data))
                await client.send_batch(
                    vmid, 1, [chunk], chunk_count=1, total_bytes=len(data), captured_at_ms=1
                )
            finally:
                await client.aclose()

        batch = rng.randbytes(65536)
        await send(batch)  # applied
        await send(batch)  # the same again: acknowledged, not applied twice
        with pytest.raises(fp.OutOfSequence, match="other content"):
            await send(rng.randbytes(65536))
    assert site.replica_image(vmid, 0).read_bytes()[65536 : 2 * 65536] == batch


async def test_a_normal_cycle_ends_its_connection_in_order(
    site: Site, server: ServerProcess
) -> None:
    """The primary ends each connection with TLS's close_notify: the server reads an
    orderly end, not a truncation (it used to log ``TLS failed: UNEXPECTED_EOF`` after
    every cycle)."""
    rng = random.Random(13)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "quiet.img", 2 * MIB, rng)
    replicator = site.replicator(vmid, "quiet", [image], server.port)
    with trio.fail_after(60):
        await replicator.cycle()  # IR
        scribble(image, rng, writes=3)
        await replicator.cycle()  # a batch
        await replicator.cycle()  # nothing to send
    # The server logs at INFO (each connection): it would have said so.
    assert server.wait_for_log("complete at sequence 0")
    log = server.log.read_text(errors="replace")
    assert log.count("primary p1.primary.example.com connected") == 3, log
    for noise in ("UNEXPECTED_EOF", "TLS failed", "peer closed the connection", "WARNING"):
        assert noise not in log, log

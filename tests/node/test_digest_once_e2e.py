"""Digest once (issue 16 item 3): the primary digests each captured block one time, at
capture; the digest travels in the pending log's record to the chunk header, and the
recovery server's check of it is the one check of the data."""

from __future__ import annotations

import pytest
import trio
import xxhash

from frtesting.server import ServerProcess
from node.primary.pending_log import CYCLE_OVERHEAD, RECORD_OVERHEAD, PendingLogCorrupt
from node.primary.tracker import ChangeTracker

from .site import Site
from .test_replication_e2e import MIB, server
from .test_resync_e2e import BLOCK, change_blocks, one_vm

__all__ = ["server"]  # the fixture, shared with the replication tests


@pytest.mark.parametrize("tracked", [True, False], ids=["tracker", "scan"])
async def test_each_changed_block_is_digested_once_on_the_primary(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch, tracked: bool
) -> None:
    rng, vmid, image, vm = one_vm(site, server, 31, 4 * MIB)
    size = image.stat().st_size
    if tracked:
        vm.tracker = ChangeTracker([size], BLOCK)
    with trio.fail_after(60):
        await vm.cycle()  # IR
        changed = change_blocks(image, rng, 9)
        if vm.tracker is not None:
            for b in changed:
                vm.tracker.report_write(0, b * BLOCK, BLOCK)
        digested: list[bytes] = []
        real = xxhash.xxh3_128_digest

        def counting(data: bytes | bytearray | memoryview) -> bytes:
            digested.append(bytes(data))
            return real(data)

        # Every caller in this process (capture, scan, pending log, frproto's encoder)
        # reaches XXH3-128 through the module attribute.
        monkeypatch.setattr(xxhash, "xxh3_128_digest", counting)
        await vm.cycle()
        monkeypatch.undo()
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    with image.open("rb") as f:
        blocks = {b: (f.seek(b * BLOCK), f.read(BLOCK))[1] for b in changed}
    for b, data in blocks.items():
        assert digested.count(data) == 1, f"block {b} digested {digested.count(data)} times"
    if tracked:
        assert len(digested) == len(changed)  # nothing else was digested either


async def test_a_block_damaged_in_the_pending_log_halts_rather_than_resends(
    site: Site, server: ServerProcess
) -> None:
    """The sender does not digest the log's data again, so the server finds the damage
    (DIGEST_MISMATCH); the log's own check then says it is the log's copy, which halts
    replication as any damaged pending cycle does (PendingLogCorrupt)."""
    rng, vmid, image, vm = one_vm(site, server, 32, 2 * MIB)
    with trio.fail_after(60):
        await vm.cycle()  # IR
        before = site.replica_image(vmid, 0).read_bytes()
        change_blocks(image, rng, 3)
        await vm.capture()
        (cycle,) = vm.pending.cycles()
        path = vm.pending.path_of(cycle.sequence)
        raw = bytearray(path.read_bytes())
        header = CYCLE_OVERHEAD - 40  # the file's header; the trailer is 40 bytes
        raw[header + RECORD_OVERHEAD + 7] ^= 1  # in the first record's data
        path.write_bytes(raw)
        with pytest.raises(PendingLogCorrupt, match="data mismatch"):
            await vm.cycle()
    assert server.wait_for_log("digest mismatch")  # the server's check found it
    assert site.replica_image(vmid, 0).read_bytes() == before  # nothing of it applied

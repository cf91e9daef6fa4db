"""Out-of-band IR (node/primary/oob_export.py, node/oob_import.py): export to a file,
import into an existing relationship, then replication by deltas only; damaged files and
wrong replicas are refused."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio
import xxhash

import frproto as fp
from node.oob_file import MAGIC, OOBFormatError, OOBRefused, read_header
from node.oob_import import import_ir
from node.primary.digest_map import DigestMap
from node.primary.oob_export import EXPORTED_MARKER, export_ir, is_exported, map_path
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState
from node.storage import ReplicaStore

from .site import PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME, Site

MIB = 1024 * 1024
IR_END_FRAME = fp.limits.ENVELOPE_SIZE + 44


def make_image(path: Path, size: int, rng: random.Random) -> Path:
    """Random data, a zero run of 2 MiB and a random last MiB."""
    data = bytearray(rng.randbytes(size))
    data[MIB : 3 * MIB] = bytes(2 * MIB)
    path.write_bytes(data)
    return path


def make_state(tmp: Path, rng: random.Random, sizes: tuple[int, ...]) -> VMReplicationState:
    images = [make_image(tmp / f"disk{i}.img", s, rng) for i, s in enumerate(sizes)]
    state = VMReplicationState(
        vmid=str(uuid.UUID(bytes=rng.randbytes(16), version=4)),
        name="vm1",
        disks=[
            {"disk_id": f"disk{i}", "path": str(p), "size": p.stat().st_size}
            for i, p in enumerate(images)
        ],
    )
    PrimaryStateStore(tmp / "state").save(state)
    return state


def disks_of(state: VMReplicationState) -> list[fp.DiskInfo]:
    return [fp.DiskInfo(d["disk_id"], d["size"]) for d in state.disks]


def create_replica(
    store: ReplicaStore, state: VMReplicationState, disks: list[fp.DiskInfo] | None = None
) -> None:
    """The relationship, as the primary's RelationshipCreate makes it on the server."""
    store.create(
        uuid.UUID(state.vmid),
        name=state.name,
        config=b"",
        disks=disks_of(state) if disks is None else disks,
        primary=PRIMARY_NAME,
        trust_group="site-a",
    )


@pytest.fixture
def exported(tmp_path: Path) -> tuple[VMReplicationState, Path]:
    state = make_state(tmp_path, random.Random(5), (5 * MIB + 4321, 3 * MIB))
    out = tmp_path / "vm1.frir"
    export_ir(state, tmp_path / "state", out, config=b"<vm/>")
    return state, out


def test_export_then_import_gives_equal_sparse_replica(tmp_path: Path) -> None:
    state = make_state(tmp_path, random.Random(1), (5 * MIB + 4321, 3 * MIB))
    out = tmp_path / "vm1.frir"
    seen: list[tuple[int, int]] = []
    result = export_ir(state, tmp_path / "state", out, progress=lambda d, t: seen.append((d, t)))
    total = 8 * MIB + 4321
    assert (result.total_bytes, result.zero_bytes, result.chunk_count) == (total, 4 * MIB, 9)
    assert result.file_bytes == out.stat().st_size < total  # zero chunks carry no payload
    assert seen[-1] == (total, total)
    assert out.read_bytes().startswith(MAGIC)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    header = read_header(out)
    assert (str(header.vmid), header.name, list(header.disks)) == (
        state.vmid,
        "vm1",
        disks_of(state),
    )

    # The primary: digest maps as the online IR saves them, the marker, state not COMPLETE.
    saved = PrimaryStateStore(tmp_path / "state").load(state.vmid)
    vm_dir = tmp_path / "state" / state.vmid
    assert saved.ir_state == "NOT_STARTED"
    assert is_exported(vm_dir)
    assert json.loads((vm_dir / EXPORTED_MARKER).read_text())["chunk_count"] == 9
    for index, disk in enumerate(state.disks):
        dmap = DigestMap.load(map_path(vm_dir, index))
        data = Path(disk["path"]).read_bytes()
        block = state.block_size
        assert dmap.block_count == -(-len(data) // block)
        for b in range(dmap.block_count):
            assert dmap.get(b) == xxhash.xxh3_128_digest(data[b * block : (b + 1) * block])

    with ReplicaStore(tmp_path / "replicas") as store:
        create_replica(store, state)
        imported = import_ir(store, out)
        replica = store.open(uuid.UUID(state.vmid))
        assert replica.ir_state is fp.IRState.COMPLETE
        assert replica.applied_sequence == 0
        assert (imported.chunk_count, imported.aggregate_digest) == (9, result.aggregate_digest)
        for index, disk in enumerate(state.disks):
            image = replica.image_path(index)
            assert image.read_bytes() == Path(disk["path"]).read_bytes()
        # sparse where the primary had zeros (2 MiB of each disk never written)
        first = replica.image_path(0).stat()
        assert first.st_blocks * 512 <= first.st_size - 2 * MIB + 64 * 1024
        # a second import is refused: the IR is complete
        with pytest.raises(OOBRefused, match="already complete"):
            import_ir(store, out)


def test_export_refuses_a_complete_ir(tmp_path: Path) -> None:
    state = make_state(tmp_path, random.Random(2), (MIB,))
    state.ir_state = IRStage.COMPLETE
    with pytest.raises(OOBRefused, match="already complete"):
        export_ir(state, tmp_path / "state", tmp_path / "x.frir")
    assert not (tmp_path / "x.frir").exists()


def _assert_not_complete(root: Path, state: VMReplicationState) -> None:
    with ReplicaStore(root) as fresh:  # what is durable, not what is in memory
        replica = fresh.open(uuid.UUID(state.vmid))
        assert replica.ir_state is not fp.IRState.COMPLETE
        assert replica.ir_cursor == (0, 0)  # nothing claimed
        assert replica.applied_sequence == 0


def test_flipped_payload_byte_is_a_digest_mismatch(
    tmp_path: Path, exported: tuple[VMReplicationState, Path]
) -> None:
    state, out = exported
    bad = tmp_path / "bad.frir"
    raw = bytearray(out.read_bytes())
    raw[-IR_END_FRAME - 1000] ^= 0x01  # inside the last chunk's (random) payload
    bad.write_bytes(raw)
    with ReplicaStore(tmp_path / "replicas") as store:
        create_replica(store, state)
        with pytest.raises(fp.DigestMismatch):
            import_ir(store, bad)
        assert store.open(uuid.UUID(state.vmid)).ir_state is fp.IRState.IN_PROGRESS
    _assert_not_complete(tmp_path / "replicas", state)
    # The good file still imports over the failed attempt (zero ranges are rewritten).
    with ReplicaStore(tmp_path / "replicas") as store:
        import_ir(store, out)
        replica = store.open(uuid.UUID(state.vmid))
        for index, disk in enumerate(state.disks):
            assert replica.image_path(index).read_bytes() == Path(disk["path"]).read_bytes()


@pytest.mark.parametrize(
    ("cut", "error"),
    [
        (IR_END_FRAME, fp.TruncatedFrame),  # ends cleanly before IREnd
        (IR_END_FRAME + 5000, fp.TruncatedFrame),  # inside a chunk
        (3, fp.TruncatedFrame),  # inside IREnd
    ],
)
def test_truncated_file_is_refused(
    tmp_path: Path,
    exported: tuple[VMReplicationState, Path],
    cut: int,
    error: type[Exception],
) -> None:
    state, out = exported
    short = tmp_path / "short.frir"
    short.write_bytes(out.read_bytes()[:-cut])
    with ReplicaStore(tmp_path / "replicas") as store:
        create_replica(store, state)
        with pytest.raises(error):
            import_ir(store, short)
    _assert_not_complete(tmp_path / "replicas", state)


def test_damaged_counts_and_trailing_data_are_refused(
    tmp_path: Path, exported: tuple[VMReplicationState, Path]
) -> None:
    state, out = exported
    raw = out.read_bytes()
    end = fp.codec.decode_frame(raw[-IR_END_FRAME:])
    assert isinstance(end, fp.IREnd)
    wrong_count = fp.IREnd(end.vmid, 0, end.chunk_count - 1, end.aggregate_digest)
    cases = {
        "count": (raw[:-IR_END_FRAME] + fp.codec.encode_frame(wrong_count), fp.CountMismatch),
        "trailing": (raw + fp.codec.encode_frame(fp.Keepalive()), OOBFormatError),
        "magic": (b"FRREPIR9" + raw[8:], OOBFormatError),
    }
    with ReplicaStore(tmp_path / "replicas") as store:
        create_replica(store, state)
        for name, (content, error) in cases.items():
            path = tmp_path / f"{name}.frir"
            path.write_bytes(content)
            with pytest.raises(error):
                import_ir(store, path)
    _assert_not_complete(tmp_path / "replicas", state)


def test_import_needs_the_relationship_with_the_same_disks(
    tmp_path: Path, exported: tuple[VMReplicationState, Path]
) -> None:
    state, out = exported
    with ReplicaStore(tmp_path / "replicas") as store:
        with pytest.raises(OOBRefused, match="no relationship"):
            import_ir(store, out)
        other = [fp.DiskInfo("disk0", 5 * MIB + 4321), fp.DiskInfo("disk1", 4 * MIB)]
        create_replica(store, state, disks=other)
        with pytest.raises(OOBRefused, match="disks"):
            import_ir(store, out)
        assert store.open(uuid.UUID(state.vmid)).ir_state is fp.IRState.NOT_STARTED


def _scribble(path: Path, rng: random.Random) -> None:
    with path.open("r+b") as image:
        for _ in range(4):
            image.seek(rng.randrange(0, path.stat().st_size - 4096))
            image.write(rng.randbytes(4096))


async def test_replication_after_import_sends_no_ir_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="frrep.primary")
    rng = random.Random(9)
    site = Site(tmp_path)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = [make_image(tmp_path / f"p{i}.img", 3 * MIB + 512 * i, rng) for i in range(2)]
    server = site.start_server()
    try:
        replicator = site.replicator(vmid, "vm1", images, server.port)
        out = tmp_path / "vm1.frir"
        await trio.to_thread.run_sync(
            lambda: export_ir(replicator.state, site.state_dir, out, config=b"cfg")
        )
        with trio.fail_after(30):
            # The first cycle creates the relationship, sends no IR, waits for the import.
            with pytest.raises(fp.Busy, match="out-of-band import"):
                await replicator.cycle()
        first_log = server.log.read_text()
        assert "created replica" in first_log
        assert "IR of" not in first_log
        assert replicator.state.ir_state != "COMPLETE"
    finally:
        server.stop()
    with ReplicaStore(site.storage) as store:
        replica = store.open(vmid)
        assert replica.ir_state is fp.IRState.NOT_STARTED  # no IR data came
        import_ir(store, out)
    _scribble(images[0], rng)  # the VM ran on after the export
    server = site.start_server()
    try:
        replicator.state.recovery_port = server.port
        with trio.fail_after(30):
            await replicator.cycle()  # sees the imported IR: COMPLETE at sequence 0
            assert (replicator.state.ir_state, replicator.state.sequence) == ("COMPLETE", 0)
            _scribble(images[1], rng)
            await replicator.cycle()  # the first delta: changes since the export
            assert replicator.state.sequence == 1
    finally:
        server.stop()
    log = server.log.read_text()
    assert "IR of" not in log  # no IR over the network
    for index, image in enumerate(images):
        assert site.replica_image(vmid, index).read_bytes() == image.read_bytes()
    # Only the changed blocks travelled (the export's digest maps were used).
    batches = [m for m in caplog.messages if re.search(r"batch \d+ applied", m)]
    assert len(batches) == 1
    sent = int(re.search(r"(\d+) bytes\)", batches[0]).group(1))  # type: ignore[union-attr]
    assert 0 < sent <= 8 * 2 * 65536  # 8 writes of 4 KiB, at most 2 blocks each


def _frctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_cli_export_and_import(tmp_path: Path) -> None:
    site = Site(tmp_path)
    rng = random.Random(4)
    image = make_image(tmp_path / "d0.img", 4 * MIB + 100, rng)
    primary_toml = tmp_path / "primary.toml"
    primary_toml.write_text(
        f"""
[primary]
name = "{PRIMARY_NAME}"
state_dir = "primary-state"
local_address = "{PRIMARY_HOST}"

[tls]
cert = "certs/{PRIMARY_NAME}.pem"
key = "certs/{PRIMARY_NAME}-key.pem"
ca = "certs/ca.pem"
"""
    )
    vmid = str(uuid.UUID(bytes=rng.randbytes(16), version=4))
    out = tmp_path / "vm.frir"

    refused = _frctl("ir", "export", "--config", str(primary_toml), vmid, "--out", str(out))
    assert refused.returncode == 4  # not found
    assert "replication enable" in refused.stderr

    enable = _frctl(
        "replication", "enable", "--config", str(primary_toml), "--vmid", vmid,
        "--name", "vmcli", "--disk", f"disk0={image}", "--server", f"{SERVER_HOST}:7443",
        "--server-name", SERVER_NAME,
    )  # fmt: skip
    assert enable.returncode == 0, enable.stderr
    export = _frctl(
        "ir", "export", "--config", str(primary_toml), vmid, "--out", str(out), "--json"
    )
    assert export.returncode == 0, export.stderr
    doc = json.loads(export.stdout)
    assert (doc["vmid"], doc["total_bytes"], doc["chunk_count"]) == (vmid, 4 * MIB + 100, 5)
    assert "100%" in export.stderr

    # Not yet on the recovery server: a clear refusal.
    missing = _frctl("ir", "import", "--config", str(site.server_config), str(out))
    assert missing.returncode == 1
    assert "no relationship" in missing.stderr

    with ReplicaStore(site.storage) as store:
        create_replica(store, PrimaryStateStore(tmp_path / "primary-state").load(vmid))
    done = _frctl("ir", "import", "--config", str(site.server_config), str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported vmcli")
    assert done.stdout.count("\n") == 1
    assert site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()

    again = _frctl("ir", "import", "--config", str(site.server_config), str(out), "--json")
    assert again.returncode == 1
    assert "already complete" in again.stderr

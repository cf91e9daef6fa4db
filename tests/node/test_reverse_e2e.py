"""Reverse replication after a failover, and failback: the failed-over side replicates
back to the former primary, sending only what differs (no IR)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import trio

from frlink.authz import Authorization, AuthorizationEntry
from frlink.tls import client_context
from frtesting.server import start_server_process
from node.failover.reverse import adopt_disks, reverse_state
from node.failover.unplanned import unplanned_failover
from node.primary.replicator import VMReplicator
from node.primary.state import PrimaryStateStore

from .site import PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME, Site
from .test_replication_e2e import MIB, make_image

BLOCK = 65536


def change_blocks(path: Path, rng: random.Random, blocks: list[int]) -> None:
    with path.open("r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))


def test_reverse_replication_sends_only_the_differences(site: Site, tmp_path: Path) -> None:
    rng = random.Random(41)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 4 * MIB, rng)  # the VM at site A
    server = site.start_server()  # site B, the recovery server
    vm = site.replicator(vmid, "vm", [image], server.port)
    trio.run(vm.cycle)
    server.stop()
    # Site A is lost. B fails over: the VM runs from B's replica.
    failed = unplanned_failover([site.storage], vmid)
    running_disk = failed.disks[0]
    change_blocks(running_disk, rng, [3, 4, 40])  # the VM writes at B
    change_blocks(image, rng, [10])  # A had written after its last cycle
    # A comes back as a recovery server holding its own disks as the replica.
    p_storage = tmp_path / "a-storage"
    auth = Authorization(
        entries=(AuthorizationEntry(SERVER_NAME, p_storage / "replicas", "reverse"),)
    )
    adopted = adopt_disks(
        auth,
        vmid,
        name="vm",
        disks=[("disk0", image)],
        primary=SERVER_NAME,
        generation=failed.generation,
    )
    config = tmp_path / "a-server.toml"
    config.write_text(
        f"""
[server]
name = "{PRIMARY_NAME}"
listen = "{PRIMARY_HOST}"
port = 0

[tls]
cert = "{site.certs}/{PRIMARY_NAME}.pem"
key = "{site.certs}/{PRIMARY_NAME}-key.pem"
ca = "{site.certs}/ca.pem"

[[authorization]]
primary = "{SERVER_NAME}"
storage = "{p_storage / "replicas"}"
trust_group = "reverse"
"""
    )
    a_server = start_server_process(config, tmp_path)
    try:
        # B replicates back: its first cycle compares digests and sends the differences.
        store = PrimaryStateStore(tmp_path / "b-primary-state")
        state = reverse_state(
            store,
            site.storage,
            vmid,
            host=PRIMARY_HOST,
            port=a_server.port,
            server_name=PRIMARY_NAME,
        )
        certs = site.certs
        reverse = VMReplicator(
            state,
            store,
            client_context(
                certs / f"{SERVER_NAME}.pem", certs / f"{SERVER_NAME}-key.pem", certs / "ca.pem"
            ),
            local_address=SERVER_HOST,
        )
        sent: list[int] = []
        real_resync = reverse.resync

        async def counted() -> object:
            result = await real_resync()
            sent.append(result.blocks_sent)
            return result

        reverse.resync = counted  # type: ignore[method-assign, assignment]
        trio.run(reverse.cycle)
        assert sent == [4]  # blocks 3, 4, 40 (B's writes) and 10 (A's lost write)
        a_replica = p_storage / "replicas" / str(vmid) / "disks" / "disk0.img"
        assert a_replica.read_bytes() == running_disk.read_bytes()
        assert adopted.generation == failed.generation
        # Then deltas, as usual.
        change_blocks(running_disk, rng, [7])
        trio.run(reverse.cycle)
        assert reverse.state.sequence == 2
        assert a_replica.read_bytes() == running_disk.read_bytes()
        # Fail back the same way: a planned failover at B (the VM stops there, the rest
        # is sent and checked), then A takes the VM at that sequence.
        change_blocks(running_disk, rng, [20])
        final = running_disk.read_bytes()
        ready = trio.run(reverse.prepare_failover)
        assert ready.ok
    finally:
        a_server.stop()
    back = unplanned_failover([p_storage / "replicas"], vmid, sequence=ready.sequence)
    assert back.disks[0].read_bytes() == final  # nothing lost, in either direction
    assert back.generation == failed.generation + 1


def test_reverse_refuses_a_vm_that_was_not_failed_over(site: Site, tmp_path: Path) -> None:
    from .test_cli_replication import frctl

    rng = random.Random(42)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    server = site.start_server()
    try:
        trio.run(site.replicator(vmid, "vm", [image], server.port).cycle)
    finally:
        server.stop()
    done = frctl(
        "failover", "reverse", "--config", str(site.write_primary_config()),
        "--server-config", str(site.server_config), str(vmid), "--to", "127.0.0.3:7443",
    )  # fmt: skip
    assert done.returncode == 1
    assert "not failed over" in done.stderr

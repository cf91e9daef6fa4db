"""Completing and cancelling a failover with frctl, on real processes: a cancelled
failover leaves the replica where replication left it, and the primary carries on; a
completed one keeps its point alone, and can no longer be cancelled."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import trio

from node.storage import ReplicaStore

from .site import Site
from .test_cli_replication import frctl
from .test_replication_e2e import MIB, make_image
from .test_reverse_e2e import change_blocks


def _json(done: object) -> dict[str, object]:
    import subprocess

    assert isinstance(done, subprocess.CompletedProcess)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert isinstance(out, dict)
    return out


def _points(site: Site, vmid: uuid.UUID) -> list[int]:
    with ReplicaStore(site.storage) as store:
        return [p.sequence for p in store.open(vmid).recovery_points()]


def test_cancel_then_replication_carries_on_then_complete(site: Site, tmp_path: Path) -> None:
    rng = random.Random(20)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    server = site.start_server()
    vm = site.replicator(vmid, "web", [image], server.port)
    trio.run(vm.cycle)
    for blocks in ([1, 2], [5], [9, 30]):
        change_blocks(image, rng, blocks)
        trio.run(vm.cycle)
    server.stop()
    port = server.port
    latest = vm.state.sequence
    before = _points(site, vmid)
    assert len(before) >= 3
    assert before[-1] == latest
    config = str(site.server_config)

    # A failover to an older point, then cancelled before the VM ran.
    hooks = tmp_path / "hooks.log"
    stop = f'echo "stop $FRREP_VMID $FRREP_SEQUENCE" >> {hooks}'
    point = str(before[-3])
    failed = _json(
        frctl("failover", "unplanned", "--config", config, str(vmid), "--point", point, "--json")
    )
    assert failed["sequence"] == before[-3]
    cancelled = _json(
        frctl("failover", "cancel", "--config", config, "web", "--json", "--stop-command", stop)
    )
    assert hooks.read_text().split() == ["stop", str(vmid), str(before[-3])]
    assert cancelled["sequence"] == latest
    assert cancelled["points"] == before
    assert cancelled["generation"] == failed["generation"] - 1  # type: ignore[operator]
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()

    # Replication carries on from where it was: the next cycle is a delta on top.
    server = site.start_server(port=port)
    try:
        vm = site.restarted(vm)
        change_blocks(image, rng, [12, 13])
        trio.run(vm.cycle)
        assert vm.state.sequence == latest + 1
        latest += 1
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    finally:
        server.stop()

    # Failed over again; the VM writes: a cancel is refused (it cannot undo the writes).
    again = _json(frctl("failover", "unplanned", "--config", config, str(vmid), "--json"))
    change_blocks(Path(str(again["disks"][0])), rng, [7])  # type: ignore[index]
    refused = frctl("failover", "cancel", "--config", config, str(vmid))
    assert refused.returncode == 1
    assert "wrote 1 blocks" in refused.stderr
    done = _json(frctl("failover", "complete", "--config", config, str(vmid), "--json"))
    assert done["points"] == [latest]
    assert _points(site, vmid) == [latest]
    late = frctl("failover", "cancel", "--config", config, str(vmid))
    assert late.returncode == 1
    assert "completed" in late.stderr
    # A complete run again is harmless.
    assert _json(frctl("failover", "complete", "--config", config, str(vmid), "--json"))[
        "points"
    ] == [latest]

"""Completing and cancelling a failover with the stand-alone recovery server running:
frctl asks it on its control socket, and it ends the failover itself while it goes on
serving; killed with SIGKILL in the middle of either, restarted, the command run again
finishes it (a cancelled VM's primary carries on at the old generation, a completed one
keeps its point alone)."""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.replicas import wait_applied
from frtesting.server import ServerProcess, start_server_process
from node.primary.replicator import VMReplicator
from node.storage.layout import ReplicaLayout
from node.storage.state import ReplicaState

from .patched_server import CRASH_AT
from .site import Site
from .test_cli_replication import frctl
from .test_replication_e2e import MIB, make_image
from .test_reverse_e2e import change_blocks


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert isinstance(out, dict)
    return out


def _state(site: Site, vmid: uuid.UUID) -> ReplicaState:
    """The replica's state file (the running server holds the replica: not opened)."""
    # The server writes the state at the apply, after the Ack (the pipelined commit).
    assert wait_applied(ReplicaLayout(site.storage, vmid))
    return ReplicaState.from_bytes((site.storage / str(vmid) / "state.json").read_bytes())


def _replicated(site: Site, rng: random.Random, port: int) -> tuple[uuid.UUID, Path, VMReplicator]:
    """A VM replicated to ``port``: its IR and three deltas (four kept points)."""
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = make_image(site.root / "disk0.img", 2 * MIB, rng)
    vm = site.replicator(vmid, "web", [image], port)
    trio.run(vm.cycle)
    for blocks in ([1, 2], [5], [9, 30]):
        change_blocks(image, rng, blocks)
        trio.run(vm.cycle)
    return vmid, image, vm


def test_cancel_and_complete_while_the_server_runs(site: Site, tmp_path: Path) -> None:
    rng = random.Random(2020)
    server = site.start_server()
    config = str(site.server_config)
    try:
        vmid, image, vm = _replicated(site, rng, server.port)
        latest = vm.state.sequence
        before = [p.sequence for p in _state(site, vmid).points]
        assert before[-1] == latest
        assert len(before) >= 3

        # Failed over to an older point, then cancelled: the stop hook runs first.
        failed = _json(
            frctl("failover", "unplanned", "--config", config, str(vmid),
                  "--point", str(before[-3]), "--json")
        )  # fmt: skip
        assert failed["server_running"] is True
        hooks = tmp_path / "hooks.log"
        stop = f'echo "stop $FRREP_VMID $FRREP_SEQUENCE" >> {hooks}'
        cancelled = _json(
            frctl("failover", "cancel", "--config", config, "web", "--json",
                  "--stop-command", stop)
        )  # fmt: skip
        assert hooks.read_text().split() == ["stop", str(vmid), str(before[-3])]
        assert cancelled["sequence"] == latest
        assert cancelled["points"] == before
        assert cancelled["generation"] == failed["generation"] - 1  # type: ignore[operator]
        # The primary carries on at the old generation, the server never stopped.
        vm = site.restarted(vm)
        change_blocks(image, rng, [12, 13])
        trio.run(vm.cycle)
        assert vm.state.sequence == latest + 1
        latest += 1
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()

        # Failed over again; the VM writes: the running server refuses the cancel.
        again = _json(frctl("failover", "unplanned", "--config", config, str(vmid), "--json"))
        change_blocks(Path(str(again["disks"][0])), rng, [7])  # type: ignore[index]
        refused = frctl("failover", "cancel", "--config", config, str(vmid))
        assert refused.returncode == 1
        assert "wrote 1 blocks" in refused.stderr
        done = _json(frctl("failover", "complete", "--config", config, str(vmid), "--json"))
        assert done["points"] == [latest]
        assert [p.sequence for p in _state(site, vmid).points] == [latest]
        late = frctl("failover", "cancel", "--config", config, str(vmid))
        assert late.returncode == 1
        assert "completed" in late.stderr
        # Run again, harmless; and the former primary stays refused.
        assert _json(frctl("failover", "complete", "--config", config, str(vmid), "--json"))[
            "points"
        ] == [latest]
        with pytest.raises(fp.NotAuthorized):
            trio.run(site.restarted(vm).cycle)
    finally:
        server.stop()


def _start_crashing(site: Site, point: str, monkeypatch: pytest.MonkeyPatch) -> ServerProcess:
    """The real server, armed to die with SIGKILL at storage crash point ``point``."""
    monkeypatch.setenv(CRASH_AT, point)
    try:
        return start_server_process(
            site.server_config, site.root, module="tests.node.patched_server"
        )
    finally:
        monkeypatch.delenv(CRASH_AT)


@pytest.mark.parametrize(
    ("action", "point"),
    [
        ("complete", "complete_decided"),
        ("complete", "complete_state_written"),
        ("cancel", "cancel_decided"),
        ("cancel", "cancel_images_restored"),
        ("cancel", "cancel_state_written"),
    ],
)
def test_server_killed_mid_ending_then_run_again(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, point: str
) -> None:
    rng = random.Random(hash(point) & 0xFFFF)
    server = _start_crashing(site, point, monkeypatch)
    port = server.port
    config = str(site.server_config)
    try:
        vmid, image, vm = _replicated(site, rng, port)
        latest = vm.state.sequence
        before = [p.sequence for p in _state(site, vmid).points]
        chosen = before[-3]
        failed = _json(
            frctl("failover", "unplanned", "--config", config, str(vmid),
                  "--point", str(chosen), "--json")
        )  # fmt: skip
        # The server dies with SIGKILL in the middle of the step: the command says so.
        cut = frctl("failover", action, "--config", config, str(vmid), "--json")
        assert cut.returncode == 1
        assert server.proc.wait(timeout=30) == -9
        assert "without an answer" in cut.stderr
    finally:
        server.kill()

    # Restarted (its recovery may finish the step), the command run again finishes it.
    site.write_server_config(port=port)
    server = site.start_server()
    try:
        ended = _json(frctl("failover", action, "--config", config, str(vmid), "--json"))
        if action == "cancel":
            assert ended["sequence"] == latest
            assert ended["points"] == before
            assert ended["generation"] == failed["generation"] - 1  # type: ignore[operator]
            # The replica is whole at where replication left it, and the primary
            # carries on at the old generation.
            assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
            vm = site.restarted(vm)
            change_blocks(image, rng, [3])
            trio.run(vm.cycle)
            assert vm.state.sequence == latest + 1
            assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        else:
            assert ended["sequence"] == chosen
            assert ended["points"] == [chosen]
            assert ended["generation"] == failed["generation"]
            state = _state(site, vmid)
            assert [p.sequence for p in state.points] == [chosen]
            assert state.failed_over
            assert not (site.storage / str(vmid) / "failover").exists()
            with pytest.raises(fp.NotAuthorized):
                trio.run(site.restarted(vm).cycle)
    finally:
        server.stop()

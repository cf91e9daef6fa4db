"""A recovery plan with the stand-alone recovery server running the whole time: the
unplanned failover of a plan of four VMs in three boot groups (the server fails each
over itself, asked on its control socket), cancelled VM by VM so that replication
carries on; then the planned failover (prepare hands each VM over in one step, protocol
1.1; planned only starts them). A VM outside the plan keeps replicating throughout."""

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
from node.primary.replicator import VMReplicator
from node.recovery_plan import Mode, load_plan, run_plan
from node.storage.layout import ReplicaLayout
from node.storage.state import ReplicaState

from .site import Site
from .test_cli_replication import frctl
from .test_replication_e2e import make_image
from .test_reverse_e2e import change_blocks

GROUPS = {"db": ["db1"], "app": ["app1", "app2"], "web": ["web1"]}
NAMES = [vm for vms in GROUPS.values() for vm in vms]
KIB = 1024


def _plan(site: Site, log: Path) -> Path:
    hook = f'echo "$FRREP_MODE $FRREP_GROUP start $FRREP_VMID $FRREP_SEQUENCE" >> {log}'
    stop = f'echo "$FRREP_MODE $FRREP_GROUP stop $FRREP_VMID" >> {log}'
    groups = ""
    for name, vms in GROUPS.items():
        groups += f'\n[[group]]\nname = "{name}"\nvms = {json.dumps(vms)}\ntimeout = 60\n'
        groups += f"start = '{hook}'\nstop = '{stop}'\n"
    path = site.root / "shop.toml"
    path.write_text(
        f"""
[plan]
name = "shop"
recovery_config = "{site.server_config.name}"
primary_config = "{site.write_primary_config().name}"
{groups}"""
    )
    return path


def _report(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    out = json.loads(done.stdout)
    assert isinstance(out, dict), done.stderr
    return out


def _hooks(log: Path, mode: str, what: str) -> list[tuple[str, str]]:
    lines = [x.split() for x in log.read_text().splitlines()] if log.exists() else []
    return [(x[1], x[3]) for x in lines if x[0] == mode and x[2] == what]


def _state(site: Site, vmid: uuid.UUID) -> ReplicaState:
    """The replica's state file, once the last acknowledged batch is applied (the server
    writes the state at the apply, after the Ack: the pipelined commit)."""
    assert wait_applied(ReplicaLayout(site.storage, vmid))
    return ReplicaState.from_bytes((site.storage / str(vmid) / "state.json").read_bytes())


def _keeps_replicating(site: Site, other: VMReplicator, image: Path, rng: random.Random) -> None:
    """One more cycle of the VM outside the plan: the running server takes it."""
    before = other.state.sequence
    change_blocks(image, rng, [int(rng.randrange(8))])
    trio.run(other.cycle)
    assert other.state.sequence == before + 1
    assert site.replica_image(other.vmid, 0).read_bytes() == image.read_bytes()


def test_a_plan_fails_over_and_back_with_the_server_running(site: Site) -> None:
    rng = random.Random(2021)
    vmids = {vm: uuid.UUID(bytes=rng.randbytes(16), version=4) for vm in NAMES}
    images = {vm: make_image(site.root / f"{vm}.img", 512 * KIB, rng) for vm in NAMES}
    other_image = make_image(site.root / "other.img", 512 * KIB, rng)
    server = site.start_server()
    try:
        reps = {vm: site.replicator(vmids[vm], vm, [images[vm]], server.port) for vm in NAMES}
        other = site.replicator(uuid.UUID(int=77, version=4), "other", [other_image], server.port)
        for rep in [*reps.values(), other]:
            trio.run(rep.cycle)  # initial replication
        for vm in NAMES:
            change_blocks(images[vm], rng, [1])
            trio.run(reps[vm].cycle)
        latest = {vm: reps[vm].state.sequence for vm in NAMES}
        log = site.root / "hooks.log"
        plan = str(_plan(site, log))

        # The dry run reaches the running server on its control socket.
        checked = _report(frctl("plan", "check", plan, "--mode", "unplanned", "--json"))
        assert checked["ok"], checked
        assert "target reachable" in json.dumps(checked["notes"])

        # The unplanned failover of the plan, by the running server, in boot order.
        done = _report(frctl("plan", "run", plan, "--mode", "unplanned", "--json"))
        assert done["ok"], done
        started = _hooks(log, "unplanned", "start")
        assert [g for g, _ in started] == ["db", "app", "app", "web"]
        assert [v for _, v in started] == [str(vmids[vm]) for vm in NAMES]
        for vm in NAMES:
            state = _state(site, vmids[vm])
            assert state.failed_over, vm
            assert state.applied_sequence == latest[vm]
            assert state.generation == 2
            assert site.replica_image(vmids[vm], 0, applied=False).read_bytes() == (
                images[vm].read_bytes()
            )
        with pytest.raises(fp.NotAuthorized):  # the former primary is refused
            trio.run(site.restarted(reps["db1"]).cycle)
        _keeps_replicating(site, other, other_image, rng)

        # Cancelled VM by VM, the server still running: the primaries carry on.
        for vm in NAMES:
            cancelled = frctl("failover", "cancel", "--config", str(site.server_config), vm)
            assert cancelled.returncode == 0, cancelled.stderr
            reps[vm] = site.restarted(reps[vm])
            change_blocks(images[vm], rng, [2])
            trio.run(reps[vm].cycle)
            assert reps[vm].state.sequence == latest[vm] + 1
            assert site.replica_image(vmids[vm], 0).read_bytes() == images[vm].read_bytes()
        _keeps_replicating(site, other, other_image, rng)

        # The planned failover: prepare at the primary hands each VM over in one step
        # (the server speaks 1.1), last group first, each stopped by its hook first.
        ready = _report(frctl("plan", "check", plan, "--mode", "prepare", "--json"))
        assert ready["ok"], ready
        prepared = _report(frctl("plan", "run", plan, "--mode", "prepare", "--json"))
        assert prepared["ok"], prepared
        stops = _hooks(log, "planned", "stop")
        assert [g for g, _ in stops] == ["web", "app", "app", "db"]
        record = json.loads((site.root / "shop.prepared.json").read_text())["vms"]
        final = {vm: images[vm].read_bytes() for vm in NAMES}
        for vm in NAMES:
            assert record[vm]["taken_over"] is True
            assert record[vm]["sequence"] == latest[vm] + 1
            state = _state(site, vmids[vm])  # taken over by the running server already
            assert state.failed_over
            assert (state.applied_sequence, state.generation) == (
                record[vm]["sequence"],
                record[vm]["generation"],
            )
        _keeps_replicating(site, other, other_image, rng)

        # planned only starts them, in boot order; nothing is failed over again.
        checked = _report(frctl("plan", "check", plan, "--mode", "planned", "--json"))
        assert checked["ok"], checked
        done = _report(frctl("plan", "run", plan, "--mode", "planned", "--json"))
        assert done["ok"], done
        started = _hooks(log, "planned", "start")
        assert [v for _, v in started] == [str(vmids[vm]) for vm in NAMES]
        # Each started at the sequence it was taken over at.
        lines = [x.split() for x in log.read_text().splitlines() if x.startswith("planned")]
        assert [int(x[4]) for x in lines if x[2] == "start"] == [
            record[vm]["sequence"] for vm in NAMES
        ]
        for vm in NAMES:
            state = _state(site, vmids[vm])
            assert (state.applied_sequence, state.generation) == (
                record[vm]["sequence"],
                record[vm]["generation"],
            )
            image = site.replica_image(vmids[vm], 0, applied=False)
            assert image.read_bytes() == final[vm], vm
        _keeps_replicating(site, other, other_image, rng)
    finally:
        server.stop()


def test_against_a_1_0_server_prepare_keeps_the_two_halves(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recovery server that speaks 1.0 only cannot take a VM over in one step (the
    primary's hand-over is NotSupported before anything is asked: here the primary's
    side is made to find that): prepare then sends the final state, verified, and
    records the sequences; planned fails each VM over at them, by the running server."""
    rng = random.Random(2022)
    vmids = {vm: uuid.UUID(bytes=rng.randbytes(16), version=4) for vm in NAMES}
    images = {vm: make_image(site.root / f"{vm}.img", 256 * KIB, rng) for vm in NAMES}
    server = site.start_server()
    try:
        for vm in NAMES:
            trio.run(site.replicator(vmids[vm], vm, [images[vm]], server.port).cycle)
        log = site.root / "hooks.log"
        plan = load_plan(_plan(site, log))

        async def speaks_1_0(self: VMReplicator, *, reverse_port: int = 0) -> fp.FailoverDone:
            raise fp.NotSupported("the recovery side speaks protocol 1.0")

        monkeypatch.setattr(VMReplicator, "hand_over", speaks_1_0)
        prepared = run_plan(plan, Mode.PREPARE)
        assert prepared.ok, prepared.table()
        record = json.loads((site.root / "shop.prepared.json").read_text())["vms"]
        for vm in NAMES:
            assert "taken_over" not in record[vm]
            assert not _state(site, vmids[vm]).failed_over  # not taken over
        done = _report(frctl("plan", "run", str(plan.path), "--mode", "planned", "--json"))
        assert done["ok"], done
        for vm in NAMES:
            state = _state(site, vmids[vm])
            assert state.failed_over
            assert state.applied_sequence == record[vm]["sequence"]
            image = site.replica_image(vmids[vm], 0, applied=False)
            assert image.read_bytes() == images[vm].read_bytes(), vm
    finally:
        server.stop()

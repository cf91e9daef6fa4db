"""A recovery plan of 5 VMs in 3 boot groups, on real processes: a group capture at the
primary, the dry run, a test failover of the whole plan at the group's point with a
failing hook in the middle group (the plan stops there and says so; a re-run carries on
without redoing what was done), the cleanup; then a planned failover of the plan
(prepare at the primary, last group first; the takeover at the recovery server in boot
order), stopped in the middle and carried on the same way."""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path

import trio

from node.storage import ReplicaStore

from .site import Site
from .test_cli_replication import frctl
from .test_replication_e2e import make_image
from .test_reverse_e2e import change_blocks

GROUPS = {"db": ["db1", "db2"], "app": ["app1", "app2"], "web": ["web1"]}
KIB = 1024


def _plan(site: Site, log: Path, flag: Path) -> Path:
    hook = f'echo "$FRREP_MODE $FRREP_GROUP start $FRREP_VMID $FRREP_SEQUENCE" >> {log}'
    stop = f'echo "$FRREP_MODE $FRREP_GROUP stop $FRREP_VMID" >> {log}'
    groups = ""
    for name, vms in GROUPS.items():
        groups += f'\n[[group]]\nname = "{name}"\nvms = {json.dumps(vms)}\ntimeout = 60\n'
        groups += f"start = '{hook}'\nstop = '{stop}'\n"
        if name == "app":
            groups += f"after = 'test -e {flag}'\n"  # the health check that fails first
    path = site.root / "shop.toml"
    path.write_text(
        f"""
[plan]
name = "shop"
recovery_config = "{site.server_config.name}"
primary_config = "{site.write_primary_config().name}"
consistent = true
test_dir = "tests-out"
{groups}"""
    )
    return path


def _report(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    out = json.loads(done.stdout)
    assert isinstance(out, dict), done.stderr
    return out


def _statuses(report: dict[str, object]) -> list[str]:
    steps = report["steps"]
    assert isinstance(steps, list)
    return [s["status"] for s in steps]


def _started(log: Path, mode: str) -> list[tuple[str, str]]:
    lines = [x.split() for x in log.read_text().splitlines()] if log.exists() else []
    return [(x[1], x[3]) for x in lines if x[0] == mode and x[2] == "start"]


def test_a_plan_of_five_vms_in_three_boot_groups(site: Site) -> None:
    rng = random.Random(2020)
    names = [vm for vms in GROUPS.values() for vm in vms]
    vmids = {vm: uuid.UUID(bytes=rng.randbytes(16), version=4) for vm in names}
    images = {vm: make_image(site.root / f"{vm}.img", 512 * KIB, rng) for vm in names}
    server = site.start_server()
    port = server.port
    reps = {vm: site.replicator(vmids[vm], vm, [images[vm]], port) for vm in names}
    for rep in reps.values():
        trio.run(rep.cycle)  # initial replication
    log, flag = site.root / "hooks.log", site.root / "app-healthy"
    plan = str(_plan(site, log, flag))

    # The group's moment, captured at the primary in one window; then each VM moves on.
    for vm in names[:-1]:  # web1 did not change: it gets an empty cycle of the moment
        change_blocks(images[vm], rng, [1])
    captured = frctl("plan", "capture", plan, "--json")
    assert captured.returncode == 0, captured.stderr
    moment = {vm: images[vm].read_bytes() for vm in names}
    sequences = json.loads(captured.stdout)["sequences"]
    # One new cycle each, sent: web1's too, though empty.
    assert sequences == {str(vmids[vm]): reps[vm].state.sequence + 1 for vm in names}
    for vm in names:
        reps[vm] = site.restarted(reps[vm])
        change_blocks(images[vm], rng, [3])
        trio.run(reps[vm].cycle)  # a newer point of each VM alone
        assert reps[vm].state.sequence > sequences[str(vmids[vm])]

    # The dry run: ready, at the group's point; nothing made.
    checked = _report(frctl("plan", "check", plan, "--mode", "test", "--json"))
    assert checked["ok"], checked
    assert checked["group_point"] == sequences
    assert not (site.root / "tests-out").exists()
    assert not list(site.root.glob("shop.*.run.json"))
    # An unplanned failover's dry run finds the running server answering on its control
    # socket (it would fail the VMs over itself).
    running = _report(frctl("plan", "check", plan, "--mode", "unplanned", "--json"))
    assert running["ok"], running
    assert "target reachable" in json.dumps(running["notes"])

    # The test failover of the whole plan: the app group's health check fails.
    stopped = frctl("plan", "run", plan, "--mode", "test", "--json")
    assert stopped.returncode == 1
    report = _report(stopped)
    assert report["stopped_at"] == "app"
    assert _statuses(report) == ["ok", "failed", "not-run"]
    assert "after hook" in json.dumps(report["steps"][1]["problems"])  # type: ignore[index]
    assert [vm for _, vm in _started(log, "test")] == [str(vmids[v]) for v in names[:4]]
    flag.touch()
    table = frctl("plan", "run", plan, "--mode", "test")  # the re-run carries on
    assert table.returncode == 0, table.stdout + table.stderr
    assert "plan shop (test failover, run): done" in table.stdout
    started = _started(log, "test")
    assert [vm for _, vm in started] == [str(vmids[v]) for v in names]  # none twice
    assert [g for g, _ in started] == ["db", "db", "app", "app", "web"]
    for vm in names:  # each at the group's moment, not its latest point
        copy = site.root / "tests-out" / "shop" / vm / "disks" / "disk0.img"
        assert copy.read_bytes() == moment[vm], vm
    cleaned = frctl("plan", "cleanup", plan, "--json")
    assert cleaned.returncode == 0, cleaned.stdout
    assert not list((site.root / "tests-out" / "shop").iterdir())
    stops = [x.split() for x in log.read_text().splitlines() if x.startswith("test-cleanup")]
    assert [s[3] for s in stops] == [str(vmids[v]) for v in reversed(names)]  # last first

    # The planned failover: prepare at the primary, last group first.
    flag.unlink()
    ready = _report(frctl("plan", "check", plan, "--mode", "prepare", "--json"))
    assert ready["ok"], ready  # every VM enabled, its recovery server answers
    prepared = _report(frctl("plan", "run", plan, "--mode", "prepare", "--json"))
    assert prepared["ok"], prepared
    stops = [x.split() for x in log.read_text().splitlines() if x.startswith("planned")]
    assert [s[1] for s in stops] == ["web", "app", "app", "db", "db"]
    assert [s[3] for s in stops] == [str(vmids[v]) for v in reversed(names)]
    final = {vm: images[vm].read_bytes() for vm in names}
    server.stop()
    stopped = frctl("plan", "run", plan, "--mode", "planned", "--json")
    assert stopped.returncode == 1
    assert _statuses(_report(stopped)) == ["ok", "failed", "not-run"]
    with ReplicaStore(site.storage) as store:
        generations = {vm: store.open(vmids[vm]).generation for vm in names}
    flag.touch()
    done = _report(frctl("plan", "run", plan, "--mode", "planned", "--json"))
    assert done["ok"], done
    assert _statuses(done) == ["done-before", "ok", "ok"]
    assert [g for g, _ in _started(log, "planned")] == ["db", "db", "app", "app", "web"]
    with ReplicaStore(site.storage) as store:
        for vm in names:
            replica = store.open(vmids[vm])
            assert replica.failed_over
            assert replica.image_path(0).read_bytes() == final[vm], vm
            if vm != "web1":  # failed over by the first run, not again
                assert replica.generation == generations[vm]

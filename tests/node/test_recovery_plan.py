"""Recovery plans without a network: the plan file, the group point, the dry run, the
step timeout, the report. Replicas are made in a site's storage directly."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from frlink.config import ConfigError
from node.recovery_plan import Mode, load_plan, run_plan
from node.recovery_plan.check import check_plan
from node.recovery_plan.points import NoGroupPoint, group_point
from node.storage import RecoveryPoint, ReplicaStore
from tests.node.storage import workload as wl

from .site import PRIMARY_NAME, Site

VMS = {"db": ["db1"], "app": ["app1", "app2"]}


def _replicas(site: Site, *, stamps: dict[str, list[int]], first: int = 1) -> dict[str, uuid.UUID]:
    """One replica per VM of ``stamps``, with a batch per capture time given."""
    vmids = {}
    with ReplicaStore(site.storage) as store:
        for n, (vm, times) in enumerate(stamps.items()):
            vmid = uuid.UUID(int=n + first)
            r = store.create(
                vmid,
                name=vm,
                config=b"c",
                disks=wl.DISKS,
                primary=PRIMARY_NAME,
                trust_group="site-a",
            )
            r.begin_ir(1)
            r.complete_ir(1)
            for seq, at in enumerate(times, 2):
                w = r.begin_batch(seq, seq - 1, at)
                w.add(0, 4096 * seq, bytes([seq]) * 4096)
                w.commit()
            vmids[vm] = vmid
    return vmids


def _plan(site: Path, body: str, *, head: str = "") -> Path:
    path = site / "plan.toml"
    path.write_text(
        f'[plan]\nname = "p"\nrecovery_config = "server.toml"\ntest_dir = "out"\n{head}\n{body}'
    )
    return path


def _groups(**extra: str) -> str:
    out = ""
    for name, vms in VMS.items():
        out += f'[[group]]\nname = "{name}"\nvms = {json.dumps(vms)}\n'
        for key, value in extra.items():
            out += f"{key} = {json.dumps(value)}\n"
    return out


def test_the_plan_file_is_checked(tmp_path: Path) -> None:
    good = _plan(tmp_path, _groups(timeout="5", start="true").replace('"5"', "5"))
    plan = load_plan(good)
    assert [g.name for g in plan.groups] == ["db", "app"]
    assert plan.vms == ["db1", "app1", "app2"]
    assert plan.groups[0].timeout == 5.0
    assert plan.test_dir == tmp_path / "out"
    for bad, says in (
        ('[[group]]\nname = "a"\nvms = ["x"]\n[[group]]\nname = "b"\nvms = ["x"]\n', "earlier"),
        ('[[group]]\nname = "a"\nvms = ["x"]\nstrat = "true"\n', "strat"),
        ('[[group]]\nname = "a/b"\nvms = ["x"]\n', "safe name"),
        ('[[group]]\nname = "a"\nvms = []\n', "list of VM names"),
        ('[[group]]\nname = "a"\nvms = ["x"]\ntimeout = 0\n', "more than 0"),
        ("", "at least one"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_plan(_plan(tmp_path, bad))


def test_the_group_point_is_the_newest_moment_every_vm_keeps() -> None:
    def pts(*stamps: int) -> list[RecoveryPoint]:
        return [RecoveryPoint(i + 1, at, 0.0) for i, at in enumerate(stamps)]

    a, b = uuid.uuid4(), uuid.uuid4()
    assert group_point({a: pts(10, 20, 30, 40), b: pts(20, 30, 35)}) == {a: 3, b: 2}
    with pytest.raises(NoGroupPoint):
        group_point({a: pts(10, 20), b: pts(15, 25)})


def test_dry_run_finds_every_problem_and_changes_nothing(site: Site) -> None:
    _replicas(site, stamps={"db1": [100, 200], "app1": [100, 200]})  # no app2
    plan = load_plan(
        _plan(
            site.root,
            _groups(start="no-such-program --go", after="true"),
            head="consistent = true",
        )
    )
    before = sorted(str(p) for p in site.root.rglob("*"))
    report = check_plan(plan, Mode.TEST)
    assert not report.ok
    text = json.dumps(report.to_json())
    assert "no replica 'app2'" in text
    assert "'no-such-program' is not a program" in text
    assert [s.status for s in report.steps] == ["problem", "problem"]
    assert sorted(str(p) for p in site.root.rglob("*")) == before
    # With the problems gone: ready, at the group point (the newest common moment).
    _replicas(site, stamps={"app2": [100, 200]}, first=99)
    plan = load_plan(_plan(site.root, _groups(start="true"), head="consistent = true"))
    report = check_plan(plan, Mode.TEST)
    assert report.ok, report.table()
    assert report.group_point is not None
    assert set(report.group_point.values()) == {3}
    assert "ready" in report.table()


def test_a_hook_past_the_step_timeout_stops_the_plan(site: Site) -> None:
    _replicas(site, stamps={"db1": [1], "app1": [1], "app2": [1]})
    body = _groups(start="true")
    body = body.replace('name = "app"\n', 'name = "app"\ntimeout = 0.5\nbefore = "sleep 30"\n')
    plan = load_plan(_plan(site.root, body))
    report = run_plan(plan, Mode.TEST)
    assert report.stopped_at == "app"
    assert [s.status for s in report.steps] == ["ok", "failed"]
    assert "before hook 'sleep 30' ran past the step's timeout" in report.steps[1].problems[0]
    table = report.table()
    assert "STOPPED at group app" in table
    assert "db1" in table


def test_a_run_killed_at_any_step_carries_on_when_run_again(site: Site) -> None:
    """``frctl plan run`` killed with SIGKILL inside a group's after hook, a VM's start
    hook (its failover done, not recorded as started) and the next group's before hook;
    each run again carries on, and each VM is failed over once."""
    from .test_cli_replication import frctl

    vmids = _replicas(site, stamps={"db1": [1, 2], "app1": [1, 2], "app2": [1, 2]})
    marks = site.root / "marks"
    marks.mkdir()

    def kill_once(tag: str, extra: str = "true") -> str:
        # $PPID of the hook's shell is frctl itself.
        return (
            f"if [ ! -e {marks}/{tag} ]; then touch {marks}/{tag}; kill -9 $PPID; "
            f"sleep 5; fi; {extra}"
        )

    started = site.root / "started.log"
    start = f'echo "$FRREP_VMID" >> {started}'
    app1 = str(vmids["app1"])
    body = (
        '[[group]]\nname = "db"\nvms = ["db1"]\n'
        f"start = {json.dumps(start)}\nafter = {json.dumps(kill_once('db-after'))}\n"
        '[[group]]\nname = "app"\nvms = ["app1", "app2"]\n'
        f"before = {json.dumps(kill_once('app-before'))}\n"
        "start = "
        + json.dumps(
            f'{start}; if [ "$FRREP_VMID" = {app1} ]; then '
            + kill_once("app1-start").replace("; true", "")
            + "; fi"
        )
        + "\n"
    )
    plan = str(_plan(site.root, body))
    kills = 0
    for _ in range(3):
        done = frctl("plan", "run", plan, "--mode", "unplanned", "--json")
        assert done.returncode == -9, done.stdout + done.stderr
        kills += 1
    done = frctl("plan", "run", plan, "--mode", "unplanned", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert [s["status"] for s in report["steps"]] == ["done-before", "ok"]
    assert kills == 3
    with ReplicaStore(site.storage) as store:
        for vm, vmid in vmids.items():
            replica = store.open(vmid)
            assert replica.failed_over, vm
            assert replica.generation == 2, vm  # one failover, not one per run
            assert replica.applied_sequence == 3, vm
    # db1 started once; app1 twice (killed inside its start hook); app2 once.
    assert started.read_text().split() == [
        str(vmids["db1"]),
        app1,
        app1,
        str(vmids["app2"]),
    ]

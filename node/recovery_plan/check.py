"""The dry run of a plan: everything a run needs is checked, nothing is changed.

For every VM: its replica is found (by name or VMID), its initial replication is
complete, it is not failed over already (unless an earlier run of the plan did it), and
its point is kept (the group point, the prepared sequence, or a latest point; a VM the
recovery side took over at the plan's prepare is failed over at exactly its prepared
sequence and generation). For every hook: its program is found. For the targets: a test
failover's directory does not exist yet and its parent can be made; for a failover, a
recovery server that runs (it holds the storage's lock, read without taking it) answers
on its control socket (a ``ping``: the target is reachable, it fails the VMs over
itself); for ``prepare``, every VM is enabled at the primary and its recovery server
answers (a connection test, as ``frctl primary test-connection``). Replica state files
are read, never opened for writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from typing import Any

import trio

from frproto import IRState
from node.failover.control import ping
from node.storage.lock import LOCK_NAME

from .hooks import StepFailed, hook_found
from .plan import RecoveryPlan
from .points import NoGroupPoint
from .report import PlanReport, StepReport, StepStatus, VMStep
from .run import Mode, choose_points, load_prepared, recovery_storages, state_path
from .state import RunState
from .targets import ReplicaView, replicas, resolve


def check_plan(plan: RecoveryPlan, mode: Mode, *, prepared: Path | None = None) -> PlanReport:
    """Check ``plan`` for a run in ``mode`` (see the module docstring)."""
    report = PlanReport(plan.name, str(mode), dry_run=True)
    groups = list(reversed(plan.groups)) if mode is Mode.PREPARE else list(plan.groups)
    report.steps = [StepReport(g.name, vms=[VMStep(vm) for vm in g.vms]) for g in groups]
    cwd = plan.path.parent
    for group, step in zip(groups, report.steps, strict=True):
        hooks = (
            [("stop", group.stop)]
            if mode is Mode.PREPARE
            else [("before", group.before), ("start", group.start), ("after", group.after)]
        )
        if mode is Mode.TEST:
            hooks.append(("stop", group.stop))  # the cleanup's
        for what, command in hooks:
            why = hook_found(command, cwd) if command else None
            if why is not None:
                step.problems.append(f"{what} hook: {why}")
    if mode is Mode.PREPARE:
        _check_primary(plan, report)
    else:
        _check_recovery(plan, mode, report, prepared)
    for step in report.steps:
        bad = step.problems or any(v.status is StepStatus.PROBLEM for v in step.vms)
        step.status = StepStatus.PROBLEM if bad else StepStatus.CHECKED
    return report


def _check_recovery(
    plan: RecoveryPlan, mode: Mode, report: PlanReport, prepared: Path | None
) -> None:
    first = report.steps[0]
    try:
        storages = recovery_storages(plan)
    except (StepFailed, OSError, ValueError) as exc:
        first.problems.append(str(exc))
        return
    record = RunState.load(state_path(plan, mode))
    views_all = replicas(storages)
    views: dict[str, ReplicaView] = {}
    for step in report.steps:
        for vm_step in step.vms:
            try:
                views[vm_step.vm] = resolve(views_all, vm_step.vm)
            except StepFailed as exc:
                vm_step.status, vm_step.note = StepStatus.PROBLEM, str(exc)
    points: dict[str, int] = dict(record.points)
    if not points and len(views) == len(plan.vms):
        try:
            points = choose_points(plan, mode, views, prepared)
        except (StepFailed, NoGroupPoint, OSError, ValueError) as exc:
            first.problems.append(str(exc))
    if points:
        report.group_point = {str(views[vm].state.vmid): s for vm, s in points.items()}
    taken: dict[str, dict[str, Any]] = {}
    if mode is Mode.PLANNED:
        with contextlib.suppress(StepFailed, OSError, ValueError):  # said above
            taken = {
                vm: done
                for vm, done in load_prepared(plan, prepared).items()
                if done.get("taken_over")
            }
    for step in report.steps:
        for vm_step in step.vms:
            view = views.get(vm_step.vm)
            if view is None:
                continue
            vm_step.vmid = str(view.state.vmid)
            problem = _replica_problem(
                plan, mode, view, points.get(vm_step.vm), record, vm_step, taken.get(vm_step.vm)
            )
            if problem:
                vm_step.status, vm_step.note = StepStatus.PROBLEM, problem
            else:
                vm_step.status = StepStatus.CHECKED
    if mode is not Mode.TEST and any(_held(s) for s in {v.storage for v in views.values()}):
        # A running server fails the VMs over itself, asked on its control socket.
        try:
            pong = ping(storages)
        except (OSError, ValueError) as exc:
            first.problems.append(
                f"a running recovery server holds the storage and does not answer on its "
                f"control socket ({exc}): stop it, or try again"
            )
        else:
            if pong.get("ok"):
                report.notes.append(
                    f"target reachable: the recovery server runs (version "
                    f"{pong.get('version')}, protocol {pong.get('protocol')}) and answers "
                    "on its control socket; it fails the VMs over itself"
                )
            else:
                first.problems.append(
                    f"the running recovery server does not fail VMs over when asked "
                    f"({pong.get('error')}): stop it to fail over"
                )


def _replica_problem(
    plan: RecoveryPlan,
    mode: Mode,
    view: ReplicaView,
    point: int | None,
    record: RunState,
    vm_step: VMStep,
    taken_over: dict[str, Any] | None = None,
) -> str | None:
    st = view.state
    done = record.vm(vm_step.vm)
    if st.ir_state != IRState.COMPLETE:
        return "its initial replication is not complete"
    if taken_over is not None and not done:
        sequence, generation = int(taken_over["sequence"]), int(taken_over["generation"])
        vm_step.sequence, vm_step.generation = sequence, generation
        if not st.failed_over or (st.applied_sequence, st.generation) != (sequence, generation):
            return (
                f"taken over at sequence {sequence} (generation {generation}) by the "
                f"prepare, but its replica is at {st.applied_sequence} (generation "
                f"{st.generation}{'' if st.failed_over else ', not failed over'})"
            )
        vm_step.note = "taken over by the prepare: only started"
        return None
    if mode is not Mode.TEST and st.failed_over and not done:
        return f"already failed over (generation {st.generation}), not by this plan"
    if done:
        vm_step.note = f"done by an earlier run ({done.get('stage')})"
        vm_step.sequence = done.get("sequence")
        return None
    want = st.applied_sequence if point is None else point
    vm_step.sequence = want
    if all(p.sequence != want for p in st.points):
        return f"no recovery point {want} is kept"
    if mode is Mode.TEST:
        if plan.test_dir is None:
            return "[plan] test_dir is needed for a test failover"
        out = plan.test_dir / plan.name / vm_step.vm
        if os.path.lexists(out):
            return f"{out} exists (clean up the last test first)"
        if not _creatable(out):
            return f"{out} cannot be made (no write access)"
    return None


def _creatable(path: Path) -> bool:
    for parent in path.parents:
        if parent.exists():
            return os.access(parent, os.W_OK | os.X_OK)
    return False


def _held(storage: Path) -> bool:
    """Whether a process holds ``storage``'s lock (tested with a shared lock that is let
    go at once: nothing is written, and no file is made)."""
    try:
        fd = os.open(storage / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _check_primary(plan: RecoveryPlan, report: PlanReport) -> None:
    from frlink.tls import client_context
    from node.primary.config import load_primary_config
    from node.primary.connection_check import check_connection
    from node.primary.operations import NotEnabled, find_vm
    from node.primary.state import PrimaryStateStore

    first = report.steps[0]
    if plan.primary_config is None:
        first.problems.append(f"{plan.path}: [plan] primary_config is needed")
        return
    try:
        config = load_primary_config(plan.primary_config)
    except (OSError, ValueError) as exc:
        first.problems.append(str(exc))
        return
    store = PrimaryStateStore(config.state_dir)
    servers: set[tuple[str, int, str]] = set()
    for step in report.steps:
        for vm_step in step.vms:
            try:
                state = find_vm(store, vm_step.vm)
            except (NotEnabled, OSError, ValueError) as exc:
                vm_step.status, vm_step.note = StepStatus.PROBLEM, str(exc)
                continue
            vm_step.vmid = str(uuid.UUID(state.vmid))
            if state.halted is not None:
                vm_step.status, vm_step.note = StepStatus.PROBLEM, f"halted: {state.halted}"
                continue
            vm_step.status = StepStatus.CHECKED
            servers.add((state.recovery_host, state.recovery_port, state.server_name))
    tls = config.tls
    for host, port, name in sorted(servers):
        result = trio.run(
            lambda h=host, p=port, n=name: check_connection(  # type: ignore[misc]
                h,
                p,
                server_name=n,
                ssl_context=client_context(tls.cert, tls.key, tls.ca),
                local_address=config.local_address,
                compression=config.compression,
                hosts=config.hosts,
                timeout=10.0,
            )
        )
        if not result.ok:
            failed = [f"{s.name}: {s.detail}" for s in result.steps if not s.ok]
            first.problems.append(f"{result.target} does not answer: {'; '.join(failed)}")

"""Running a recovery plan: its boot groups in order, each as one step with a timeout.

A step (one boot group) is: the group's ``before`` hook; each VM failed over (or, for a
test, copied out) at its point, then its ``start`` hook; the group's ``after`` hook (a
health check: the group is up). The next group starts only once the step is done. A
step that fails (a hook exits non-zero or runs past what is left of the step's timeout,
a failover is refused) stops the plan there: the report says which step and why, the
later groups are not run, and running the plan again carries on from that group
(``state.py``), without redoing the VMs it had finished.

Modes (``docs/recovery-plans.md``):

* ``test``: each VM's test failover (a copy of its point in ``test_dir/<plan>/<vm>``;
  replication goes on); :func:`clean_up_test` removes them, last group first;
* ``unplanned``: each VM failed over at the recovery server: offline when it is stopped,
  else by the running server itself, asked on its control socket
  (``node/failover/control.py``), as ``frctl failover unplanned``;
* ``prepare`` (at the primary) then ``planned`` (at the recovery server): the first runs
  the groups last-first, stopping each VM (``stop`` hook); where the recovery server
  speaks 1.1 it hands the VM over in one step (the protocol's planned failover, as
  ``frctl failover planned``: the server takes it over at its final state, running),
  else it sends the final state, verified; it records each VM's sequence (and, taken
  over, its generation). The second starts each VM in boot order: one taken over
  already is only started; another is failed over at exactly its sequence.

With ``consistent = true``, ``test`` and ``unplanned`` fail over to the plan's group
point (``points.py``); otherwise each VM to its latest point.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import frproto
from node.config import load_recovery_server_config
from node.failover.control import ask_running_server, running_copy
from node.failover.test import (
    TEST_MARKER,
    HookFailed,
    clean_up_test_failover,
    start_test_failover,
)
from node.failover.unplanned import unplanned_failover
from node.storage.lock import StorageBusy
from node.storage.point_copy import PointCopy

from .hooks import StepFailed, run_hook, vm_env
from .plan import BootGroup, RecoveryPlan
from .points import NoGroupPoint, group_point
from .report import PlanReport, StepReport, StepStatus, VMStep
from .state import RunState
from .targets import ReplicaView, replicas, resolve


class Mode(StrEnum):
    TEST = "test"
    UNPLANNED = "unplanned"
    PREPARE = "prepare"  #: the primary's half of a planned failover
    PLANNED = "planned"  #: the recovery server's half, at the prepared sequences


#: The errors a VM's step turns into a failed step (anything else is a bug: it raises).
_VM_ERRORS = (frproto.FrprotoError, HookFailed, StorageBusy, OSError, ValueError, NoGroupPoint)


@dataclass
class _Step:
    """The clock of one group's step."""

    plan: RecoveryPlan
    group: BootGroup
    mode: Mode
    deadline: float
    clock: Callable[[], float]
    vmids: str = ""

    def left(self) -> float:
        return self.deadline - self.clock()

    def env(self) -> dict[str, str]:
        return {
            "FRREP_PLAN": self.plan.name,
            "FRREP_GROUP": self.group.name,
            "FRREP_MODE": str(self.mode),
            "FRREP_VMIDS": self.vmids,
        }

    def hook(self, what: str, command: str | None, extra: dict[str, str] | None = None) -> None:
        if command:
            env = {**self.env(), **(extra or {})}
            run_hook(what, command, env, timeout=self.left(), cwd=self.plan.path.parent)

    def in_time(self, what: str) -> None:
        if self.left() <= 0:
            raise StepFailed(f"{what}: the step ran past its timeout of {self.group.timeout:g} s")


def state_path(plan: RecoveryPlan, mode: Mode) -> Path:
    """The run record of ``plan`` in ``mode``."""
    base = plan.state_file
    return base.with_name(f"{base.name.removesuffix('.run.json')}.{mode}.run.json")


def prepared_path(plan: RecoveryPlan) -> Path:
    """Where ``prepare`` writes the sequences ``planned`` fails over at."""
    base = plan.state_file
    return base.with_name(f"{base.name.removesuffix('.run.json')}.prepared.json")


def recovery_storages(plan: RecoveryPlan) -> list[Path]:
    """The recovery server's storage places (``[plan] recovery_config``)."""
    if plan.recovery_config is None:
        raise StepFailed(f"{plan.path}: [plan] recovery_config is needed for this mode")
    return [s.resolve() for s in load_recovery_server_config(plan.recovery_config).storages]


def load_prepared(plan: RecoveryPlan, prepared: Path | None) -> dict[str, dict[str, Any]]:
    """What ``prepare`` recorded of each VM (``sequence``; ``taken_over`` and
    ``generation`` when the recovery side took it over in one step).

    Raises:
        StepFailed: no such file, or a VM of the plan missing from it.
    """
    path = prepared or prepared_path(plan)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StepFailed(
            f"no prepared sequences in {path}: run the plan's prepare at the primary first"
        ) from None
    vms = {str(k): dict(v) for k, v in doc.get("vms", {}).items()}
    missing = [vm for vm in plan.vms if vm not in vms]
    if missing:
        raise StepFailed(f"{path}: no prepared sequence for {missing}")
    return vms


def choose_points(
    plan: RecoveryPlan, mode: Mode, views: dict[str, ReplicaView], prepared: Path | None
) -> dict[str, int]:
    """Each VM's point: the prepared sequence (planned), the group point (consistent),
    else none (each VM's latest, chosen when it fails over)."""
    if mode is Mode.PLANNED:
        vms = load_prepared(plan, prepared)
        return {vm: int(vms[vm]["sequence"]) for vm in plan.vms}
    if plan.consistent:
        by_vmid = group_point({v.state.vmid: v.state.points for v in views.values()})
        return {vm: by_vmid[views[vm].state.vmid] for vm in plan.vms}
    return {}


def run_plan(
    plan: RecoveryPlan,
    mode: Mode,
    *,
    prepared: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> PlanReport:
    """Run ``plan`` in ``mode`` (see the module docstring); the report of every step.
    Never raises for a step that fails: the report says where the plan stopped."""
    if mode is Mode.PREPARE:
        from .prepare import prepare_plan

        return prepare_plan(plan, clock=clock)
    report = PlanReport(plan.name, str(mode))
    record = RunState.load(state_path(plan, mode))
    steps = [StepReport(g.name, vms=[VMStep(vm) for vm in g.vms]) for g in plan.groups]
    report.steps = steps
    try:
        storages = recovery_storages(plan)
        views_all = replicas(storages)
        views = {vm: resolve(views_all, vm) for vm in plan.vms}
        if not record.points:
            record.points = choose_points(plan, mode, views, prepared)
            record.save()
    except (StepFailed, NoGroupPoint, OSError, ValueError) as exc:
        steps[0].status = StepStatus.FAILED
        steps[0].problems.append(str(exc))
        return report
    if record.points:
        report.group_point = {str(views[vm].state.vmid): s for vm, s in record.points.items()}
    taken: dict[str, dict[str, Any]] = {}
    if mode is Mode.PLANNED:
        try:
            taken = {
                vm: done
                for vm, done in load_prepared(plan, prepared).items()
                if done.get("taken_over")
            }
        except (StepFailed, OSError, ValueError) as exc:
            steps[0].status = StepStatus.FAILED
            steps[0].problems.append(str(exc))
            return report
    failed = False
    for group, step in zip(plan.groups, steps, strict=True):
        if failed:
            continue  # NOT_RUN
        for vm_step in step.vms:
            vm_step.vmid = str(views[vm_step.vm].state.vmid)
        if group.name in record.groups_done:
            step.status = StepStatus.DONE_BEFORE
            for vm_step in step.vms:
                _fill(vm_step, record.vm(vm_step.vm), StepStatus.DONE_BEFORE)
            continue
        started = clock()
        clock_ = _Step(plan, group, mode, started + group.timeout, clock)
        clock_.vmids = " ".join(v.vmid for v in step.vms)
        try:
            clock_.hook("before hook", group.before)
            for vm_step in step.vms:
                _vm(
                    plan,
                    mode,
                    clock_,
                    storages,
                    views[vm_step.vm],
                    vm_step,
                    record,
                    taken.get(vm_step.vm),
                )
            clock_.in_time(f"group {group.name}")
            clock_.hook("after hook", group.after)
            clock_.in_time(f"group {group.name}")
        except (StepFailed, *_VM_ERRORS) as exc:
            step.status = StepStatus.FAILED
            step.problems.append(str(exc))
            failed = True
        else:
            step.status = StepStatus.OK
            record.groups_done.append(group.name)
            record.save()
        step.seconds = clock() - started
    return report


def _fill(vm_step: VMStep, done: dict[str, Any], status: StepStatus) -> None:
    vm_step.status = status
    vm_step.sequence = done.get("sequence")
    vm_step.generation = done.get("generation")
    vm_step.directory = str(done.get("directory", ""))


def _vm(
    plan: RecoveryPlan,
    mode: Mode,
    step: _Step,
    storages: list[Path],
    view: ReplicaView,
    vm_step: VMStep,
    record: RunState,
    taken_over: dict[str, Any] | None = None,
) -> None:
    """One VM of a step: failed over (or copied out; or, ``taken_over`` by the recovery
    side at the plan's prepare, only checked), then started; recorded."""
    name, vmid = vm_step.vm, view.state.vmid
    done = record.vm(name)
    if done.get("stage") == "done":
        _fill(vm_step, done, StepStatus.DONE_BEFORE)
        return
    step.in_time(f"VM {name}")
    point = record.points.get(name)
    vm_step.status = StepStatus.FAILED  # until it is done
    if mode is Mode.TEST:
        copy = _test_copy(plan, storages, vmid, name, point, done, record)
    else:
        if done.get("stage") == "failed-over":
            # Failed over by a run stopped since (its start hook failed): not again.
            sequence, generation = int(done["sequence"]), int(done["generation"])
        elif taken_over is not None:
            sequence, generation = _taken_over(view, name, taken_over)
        else:
            sequence, generation = _fail_over(storages, vmid, point)
        copy = running_copy(view.storage, vmid, sequence)
        record.note(
            name,
            stage="failed-over",
            sequence=sequence,
            generation=generation,
            directory=str(copy.directory),
        )
    vm_step.sequence, vm_step.directory = copy.sequence, str(copy.directory)
    vm_step.generation = record.vm(name).get("generation")
    step.hook(f"start hook of {name}", step.group.start, vm_env(copy))
    record.note(name, stage="done")
    vm_step.status = StepStatus.OK


def _fail_over(storages: list[Path], vmid: uuid.UUID, point: int | None) -> tuple[int, int]:
    """Fail ``vmid`` over at ``point``: offline, or by the running recovery server (it
    holds the storage) asked on its control socket; the sequence and generation."""
    try:
        result = unplanned_failover(storages, vmid, sequence=point)
    except StorageBusy:
        try:
            reply = ask_running_server(storages, vmid, point)
        except OSError as exc:
            raise StepFailed(
                f"the recovery server holds the storage and does not answer on its control "
                f"socket ({exc})"
            ) from None
        if not reply.get("ok"):
            raise StepFailed(f"the recovery server refused: {reply.get('error')}") from None
        return int(reply["sequence"]), int(reply["generation"])
    return result.sequence, result.generation


def _taken_over(view: ReplicaView, name: str, prepared: dict[str, Any]) -> tuple[int, int]:
    """A VM the recovery side took over at the plan's prepare: its replica must be failed
    over at the prepared sequence and generation (read from its state file: the server
    may be running); the sequence and generation."""
    from node.failover.complete import replica_state

    state = replica_state(view.storage, view.state.vmid)
    sequence, generation = int(prepared["sequence"]), int(prepared["generation"])
    if not state.failed_over or (state.applied_sequence, state.generation) != (
        sequence,
        generation,
    ):
        raise StepFailed(
            f"VM {name} was taken over at sequence {sequence} (generation {generation}), but "
            f"its replica is at {state.applied_sequence} (generation {state.generation}"
            f"{'' if state.failed_over else ', not failed over'})"
        )
    return sequence, generation


def _test_copy(
    plan: RecoveryPlan,
    storages: list[Path],
    vmid: uuid.UUID,
    name: str,
    point: int | None,
    done: dict[str, Any],
    record: RunState,
) -> PointCopy:
    """The VM's test copy: built, or the one an earlier run built (its start hook had
    not succeeded)."""
    if done.get("stage") == "built":
        directory = Path(done["directory"])
        return PointCopy(
            vmid,
            int(done["sequence"]),
            directory,
            directory / "config.bin",
            tuple(Path(p) for p in done["disks"]),
            0,
            0.0,
        )
    if plan.test_dir is None:
        raise StepFailed(f"{plan.path}: [plan] test_dir is needed for a test failover")
    out = plan.test_dir / plan.name / name
    copy = _built_before(out, vmid) or start_test_failover(storages, vmid, out, sequence=point)
    record.note(
        name,
        stage="built",
        vmid=str(vmid),
        sequence=copy.sequence,
        directory=str(copy.directory),
        disks=[str(p) for p in copy.disks],
    )
    return copy


def _built_before(out: Path, vmid: uuid.UUID) -> PointCopy | None:
    """The test copy of ``vmid`` a run killed before it recorded it left in ``out``
    (whole and marked: the copy is renamed into place only then), or None."""
    try:
        marker = json.loads((out / TEST_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("vmid") != str(vmid):
        return None
    disks = tuple(out / "disks" / Path(str(d)).name for d in marker.get("disks", []))
    return PointCopy(vmid, int(marker["sequence"]), out, out / "config.bin", disks, 0, 0.0)


def clean_up_test(plan: RecoveryPlan) -> PlanReport:
    """Remove the plan's test failovers, last group first (each VM's ``stop`` hook, then
    its directory), and the test run's record."""
    report = PlanReport(plan.name, "test-cleanup")
    record = RunState.load(state_path(plan, Mode.TEST))
    for group in reversed(plan.groups):
        step = StepReport(group.name, status=StepStatus.OK)
        report.steps.append(step)
        for name in reversed(group.vms):
            done = record.vm(name)
            vm_step = VMStep(name, status=StepStatus.OK)
            step.vms.append(vm_step)
            directory = done.get("directory")
            if not directory or not os.path.lexists(directory):
                vm_step.note = "nothing to remove"
                continue
            try:
                if group.stop:
                    env = {
                        "FRREP_PLAN": plan.name,
                        "FRREP_GROUP": group.name,
                        "FRREP_MODE": "test-cleanup",
                        "FRREP_VMID": str(done.get("vmid", "")),
                        "FRREP_VM_DIR": str(directory),
                        "FRREP_DISKS": ":".join(done.get("disks", [])),
                    }
                    run_hook(
                        f"stop hook of {name}",
                        group.stop,
                        env,
                        timeout=group.timeout,
                        cwd=plan.path.parent,
                    )
                clean_up_test_failover(Path(directory))
                vm_step.directory = str(directory)
            except (StepFailed, OSError, ValueError) as exc:
                vm_step.status = step.status = StepStatus.FAILED
                step.problems.append(f"{name}: {exc}")
    if report.ok:
        state_path(plan, Mode.TEST).unlink(missing_ok=True)
    return report

"""The primary's half of a plan's planned failover: the groups last-first (the servers
stop before the database they use), each VM stopped by the group's ``stop`` hook, then:

* where its recovery server speaks 1.1, handed over in one step
  (:meth:`VMReplicator.hand_over`, the protocol's planned failover, as ``frctl failover
  planned``): the server, running, checks that it holds exactly the final state and
  takes the VM over at a new generation; ``planned`` then only starts it;
* against a 1.0-only server (the hand-over is NotSupported, nothing asked), its final
  state sent and verified (``VMReplicator.prepare_failover``); ``planned`` then fails it
  over at that sequence.

Each VM's sequence (and, taken over, its generation) is recorded for ``planned`` in
``<plan>.prepared.json``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import trio

import frproto
from node.primary.config import load_primary_config
from node.primary.operations import find_vm, replicator_for
from node.primary.replicator import VMReplicator
from node.primary.state import PrimaryStateStore, write_file_atomic

from .hooks import StepFailed, run_hook
from .plan import RecoveryPlan
from .report import PlanReport, StepReport, StepStatus, VMStep
from .state import RunState


def prepare_plan(plan: RecoveryPlan, *, clock: Callable[[], float] = time.monotonic) -> PlanReport:
    """Prepare every VM of ``plan`` for its planned failover (see the module docstring).
    Never raises for a step that fails: the report says where it stopped."""
    from .run import Mode, prepared_path, state_path

    report = PlanReport(plan.name, str(Mode.PREPARE))
    record = RunState.load(state_path(plan, Mode.PREPARE))
    groups = list(reversed(plan.groups))
    report.steps = [StepReport(g.name, vms=[VMStep(vm) for vm in reversed(g.vms)]) for g in groups]
    if plan.primary_config is None:
        report.steps[0].status = StepStatus.FAILED
        report.steps[0].problems.append(f"{plan.path}: [plan] primary_config is needed")
        return report
    config = load_primary_config(plan.primary_config)
    store = PrimaryStateStore(config.state_dir)
    failed = False
    for group, step in zip(groups, report.steps, strict=True):
        if failed:
            continue
        started = clock()
        try:
            for vm_step in step.vms:
                done = record.vm(vm_step.vm)
                if done.get("stage") == "prepared":
                    vm_step.vmid, vm_step.sequence = done["vmid"], done["sequence"]
                    vm_step.generation = done.get("generation")
                    vm_step.status = StepStatus.DONE_BEFORE
                    continue
                state = find_vm(store, vm_step.vm)
                vm_step.vmid = state.vmid
                vm_step.status = StepStatus.FAILED
                left = started + group.timeout - clock()
                if group.stop:
                    env = {
                        "FRREP_PLAN": plan.name,
                        "FRREP_GROUP": group.name,
                        "FRREP_MODE": "planned",
                        "FRREP_VMID": state.vmid,
                    }
                    run_hook(
                        f"stop hook of {vm_step.vm}",
                        group.stop,
                        env,
                        timeout=left,
                        cwd=plan.path.parent,
                    )
                replicator = replicator_for(config, state.vmid)
                left = started + group.timeout - clock()
                if left <= 0:
                    raise StepFailed(f"group {group.name}: past its timeout of {group.timeout:g} s")
                sequence, generation = trio.run(_prepare, replicator, left)
                if generation is None:
                    record.note(vm_step.vm, stage="prepared", vmid=state.vmid, sequence=sequence)
                else:
                    record.note(
                        vm_step.vm,
                        stage="prepared",
                        vmid=state.vmid,
                        sequence=sequence,
                        generation=generation,
                        taken_over=True,
                    )
                vm_step.sequence, vm_step.generation = sequence, generation
                vm_step.status = StepStatus.OK
        except Exception as exc:  # a hook, the network, TLS, a replica that differs
            step.status = StepStatus.FAILED
            step.problems.append(f"{type(exc).__name__}: {exc}")
            failed = True
        else:
            step.status = StepStatus.OK
        step.seconds = clock() - started
    if not failed:
        doc = {"plan": plan.name, "vms": record.vms}
        write_file_atomic(
            prepared_path(plan), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        )
    return report


async def _prepare(replicator: VMReplicator, timeout: float) -> tuple[int, int | None]:
    """The VM handed over (1.1), or its last cycle and verification (1.0), within
    ``timeout``; its final sequence, and the generation it was taken over at (None: not
    taken over, a 1.0-only server)."""
    try:
        with trio.fail_after(timeout):
            try:
                done = await replicator.hand_over()
            except frproto.NotSupported:
                # A 1.0-only recovery server: the two halves (no request was sent).
                result = await replicator.prepare_failover()
                return result.sequence, None
    except trio.TooSlowError:
        raise StepFailed(
            f"{replicator.state.name}: its hand-over ran past the step's timeout"
        ) from None
    return done.sequence, done.generation

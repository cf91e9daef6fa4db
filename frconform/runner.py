"""Running the scenarios against one endpoint, and the per-requirement verdicts.

1. A probe connection negotiates, to learn what the endpoint is (``recovery_type``).
2. Each scenario runs if it applies to that kind of endpoint (and has what it needs),
   within a time limit of its own.
3. Every VM the run created is removed (RelationshipOpen, then RelationshipDelete).
4. Each requirement of ``docs/protocol.md`` gets one verdict: failed if any check of it
   failed, passed if some passed and none failed, else not applicable, with the reason
   (a requirement on primaries, a kind of endpoint it does not apply to, not reached
   after an earlier failure, or one no scenario checks yet).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

import trio

import frproto as fp

from . import scenarios as _scenarios  # noqa: F401  (registers the scenarios)
from .requirements import Requirement, load_requirements
from .scenario import (
    KIND_NAMES,
    SCENARIOS,
    Check,
    Context,
    Created,
    Options,
    Scenario,
    Status,
    not_applicable,
    run_one,
)
from .wire import Closed, HarnessError, Target, connect

#: Seconds one scenario may take (each answer also has the target's own timeout).
SCENARIO_SECONDS = 120.0
#: Subjects of requirements that bind the primary, not the endpoint under test.
_PRIMARY_SUBJECTS = frozenset({"primary", "sender"})


@dataclass
class Verdict:
    """One requirement's result."""

    requirement: Requirement
    status: Status
    reason: str = ""
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAILED]


@dataclass
class Report:
    """What a run found."""

    endpoint: str
    kind: fp.RecoveryType | None
    verdicts: list[Verdict]
    #: Scenarios that stopped outside any check (a setup step failed): name, error.
    errors: list[tuple[str, str]]
    #: VMs the run could not remove, and why.
    leftovers: list[str]
    scenarios_run: int
    seconds: float

    @property
    def ok(self) -> bool:
        """No requirement failed, no scenario broke, nothing was left behind."""
        return not (self.count(Status.FAILED) or self.errors or self.leftovers)

    def count(self, status: Status) -> int:
        return sum(1 for v in self.verdicts if v.status is status)


def _named(requirement: str, only: Collection[str]) -> bool:
    """Whether ``only`` names ``requirement``, by its id or its prefix ("NEG", "NEG-")."""
    return any(requirement == o or requirement.startswith(o.rstrip("-") + "-") for o in only)


def selected(scenario: Scenario, only: Collection[str]) -> bool:
    """Whether ``scenario`` checks a requirement named (by id or prefix) in ``only``."""
    if not only:
        return True
    return any(_named(r, only) for r in scenario.requirements)


async def probe(target: Target) -> fp.RecoveryType:
    """What the endpoint is, from a plain negotiation."""
    wire = await connect(target)
    try:
        await wire.send(fp.NegotiateRequest())
        answer = await wire.receive()
    finally:
        await wire.aclose()
    if isinstance(answer, Closed):
        raise HarnessError(
            "the endpoint closed the connection instead of answering a NegotiateRequest "
            "(does it trust the harness's certificate?)"
        )
    if not isinstance(answer, fp.NegotiateResponse):
        raise HarnessError(f"the endpoint did not answer a NegotiateRequest: {answer}")
    if answer.status != 0:
        raise HarnessError(
            f"the endpoint refused a plain negotiation: {fp.jsonable.describe(answer)}"
        )
    return answer.recovery_type


async def run(
    target: Target,
    options: Options | None = None,
    *,
    only: Collection[str] = (),
    requirements: dict[str, Requirement] | None = None,
    parallel: int = 8,
) -> Report:
    """Run every selected scenario against ``target`` (see the module docstring)."""
    started = time.monotonic()
    options = options or Options()
    reqs = requirements if requirements is not None else load_requirements()
    kind = await probe(target)
    checks: list[Check] = []
    errors: list[tuple[str, str]] = []
    created: list[Created] = []
    runnable: list[Scenario] = []
    for sc in SCENARIOS:
        if not selected(sc, only):
            continue
        if kind not in sc.kinds:
            kinds = " or ".join(KIND_NAMES[k] for k in sorted(sc.kinds))
            why = f"applies to {kinds}; the endpoint is {KIND_NAMES[kind]}"
            checks += not_applicable(sc.requirements, sc.name, why)
        elif sc.needs and getattr(options, sc.needs) is None:
            option = "--" + sc.needs.replace("_", "-")
            checks += not_applicable(sc.requirements, sc.name, f"needs {option}")
        else:
            runnable.append(sc)
    # Scenarios are independent (each makes its own VMs and connections): several run at
    # once, as many primaries would; each result is kept in the registry's order.
    done: dict[int, tuple[Context, str]] = {}
    limiter = trio.CapacityLimiter(parallel)

    async def one(index: int, sc: Scenario) -> None:
        async with limiter:
            ctx = Context(target, kind, options, sc)
            with trio.move_on_after(SCENARIO_SECONDS) as scope:
                error = await run_one(ctx)
            if scope.cancelled_caught:
                error = ctx.broken = f"did not finish within {SCENARIO_SECONDS:g} s"
            done[index] = (ctx, error)

    async with trio.open_nursery() as nursery:
        for index, sc in enumerate(runnable):
            if not sc.alone:
                nursery.start_soon(one, index, sc)
    # Those that fill the endpoint's connection bounds run last, one at a time.
    for index, sc in enumerate(runnable):
        if sc.alone:
            await one(index, sc)
    for index, sc in enumerate(runnable):
        ctx, error = done[index]
        if error:
            errors.append((sc.name, error))
        seen = {c.requirement for c in ctx.checks}
        why = f"not reached: {ctx.broken}" if ctx.broken else "not reached"
        checks += ctx.checks
        checks += not_applicable([r for r in sc.requirements if r not in seen], sc.name, why)
        created += ctx.created
    ran = len(runnable)
    leftovers = [await _remove(vm) for vm in _unique(created)]
    return Report(
        endpoint=target.describe(),
        kind=kind,
        verdicts=verdicts(reqs, checks, only),
        errors=errors,
        leftovers=[left for left in leftovers if left],
        scenarios_run=ran,
        seconds=time.monotonic() - started,
    )


def verdicts(
    reqs: dict[str, Requirement], checks: list[Check], only: Collection[str] = ()
) -> list[Verdict]:
    """One verdict per requirement, in the document's order."""
    by_id: dict[str, list[Check]] = {}
    for check in checks:
        by_id.setdefault(check.requirement, []).append(check)
    out: list[Verdict] = []
    for rid, req in reqs.items():
        if only and not _named(rid, only):
            continue
        mine = by_id.get(rid, [])
        statuses = {c.status for c in mine}
        if Status.FAILED in statuses:
            out.append(Verdict(req, Status.FAILED, "", mine))
        elif Status.PASSED in statuses:
            out.append(Verdict(req, Status.PASSED, "", mine))
        elif mine:
            out.append(Verdict(req, Status.NOT_APPLICABLE, mine[0].detail, mine))
        elif req.subject in _PRIMARY_SUBJECTS:
            why = f"binds the {req.subject}; the harness tests the recovery endpoint"
            out.append(Verdict(req, Status.NOT_APPLICABLE, why))
        else:
            out.append(Verdict(req, Status.NOT_APPLICABLE, "no scenario checks it over the wire"))
    return out


async def _remove(vm: Created) -> str:
    """Remove a VM of the run at its endpoint; "" when done, else what is left and why."""
    try:
        wire = await connect(vm.target)
    except HarnessError as exc:
        return f"VM {vm.vmid} at {vm.target.describe()}: {exc}"
    try:
        await wire.send(fp.NegotiateRequest())
        if not isinstance(await wire.receive(), fp.NegotiateResponse):
            return f"VM {vm.vmid}: negotiation failed at cleanup"
        gone = (fp.ErrorCode.VM_NOT_HERE, fp.ErrorCode.UNKNOWN_VM)
        await wire.send(fp.RelationshipOpen(vm.vmid))
        opened = await wire.receive()
        if isinstance(opened, fp.Error) and opened.code in gone:
            # No replica. Placed by a broker but never created? Creating it is what lets
            # the node remove its record (a node with no record refuses the create too).
            name = f"frconform-{vm.vmid.hex[:12]}"
            await wire.send(fp.RelationshipCreate(vm.vmid, name, vm.disks, b"frconform"))
            opened = await wire.receive()
            if isinstance(opened, fp.Error) and opened.code in gone:
                return ""  # nothing of it there
        if not isinstance(opened, fp.RelationshipAccepted):
            return f"VM {vm.vmid} at {vm.target.describe()}: not opened for removal: {opened}"
        await wire.send(fp.RelationshipDelete(vm.vmid))
        done = await wire.receive()
        if not (isinstance(done, fp.Ack) and done.kind == fp.AckKind.RELATIONSHIP_DELETED):
            return f"VM {vm.vmid} at {vm.target.describe()}: not removed: {done}"
        return ""
    except HarnessError as exc:
        return f"VM {vm.vmid} at {vm.target.describe()}: {exc}"
    finally:
        await wire.aclose()


def _unique(created: list[Created]) -> list[Created]:
    seen: dict[uuid.UUID, Created] = {}
    for vm in created:
        seen.setdefault(vm.vmid, vm)
    return list(seen.values())

"""A plan run's report: one entry per step, as JSON and as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class StepStatus(StrEnum):
    OK = "ok"  #: done in this run
    DONE_BEFORE = "done-before"  #: done by an earlier run (a re-run carries on)
    FAILED = "failed"  #: the plan stopped here
    NOT_RUN = "not-run"  #: after the step that failed
    CHECKED = "checked"  #: a dry run found it ready
    PROBLEM = "problem"  #: a dry run found something wrong


@dataclass
class VMStep:
    """One VM of a step."""

    vm: str  #: as the plan names it
    vmid: str = ""
    sequence: int | None = None  #: the point it failed over to (or will)
    generation: int | None = None
    directory: str = ""
    status: StepStatus = StepStatus.NOT_RUN
    note: str = ""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"vm": self.vm, "vmid": self.vmid, "status": str(self.status)}
        for key in ("sequence", "generation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.directory:
            out["directory"] = self.directory
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class StepReport:
    """One boot group's step."""

    group: str
    status: StepStatus = StepStatus.NOT_RUN
    seconds: float = 0.0
    vms: list[VMStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "status": str(self.status),
            "seconds": round(self.seconds, 3),
            "vms": [v.to_json() for v in self.vms],
            "problems": list(self.problems),
        }


@dataclass
class PlanReport:
    """What a run (or a dry run) of a plan did, step by step."""

    plan: str
    mode: str
    dry_run: bool = False
    steps: list[StepReport] = field(default_factory=list)
    #: The group point (VMID -> sequence) when the plan is consistent.
    group_point: dict[str, int] | None = None
    #: What a dry run found that is not a problem (the target is reachable...).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        bad = (StepStatus.FAILED, StepStatus.PROBLEM, StepStatus.NOT_RUN)
        return all(s.status not in bad for s in self.steps)

    @property
    def stopped_at(self) -> str | None:
        """The group the plan stopped at (None: it did not stop)."""
        for s in self.steps:
            if s.status in (StepStatus.FAILED, StepStatus.PROBLEM):
                return s.group
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "plan": self.plan,
            "mode": self.mode,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "stopped_at": self.stopped_at,
            "group_point": self.group_point,
            "notes": list(self.notes),
            "steps": [s.to_json() for s in self.steps],
        }

    def table(self) -> str:
        """The steps as a text table, one line per VM, then the problems."""
        rows = [("STEP", "GROUP", "STATUS", "VM", "VMID", "POINT", "GEN", "SECONDS")]
        for n, step in enumerate(self.steps, 1):
            for i, vm in enumerate(step.vms or [VMStep("-")]):
                rows.append(
                    (
                        str(n) if i == 0 else "",
                        step.group if i == 0 else "",
                        str(step.status) if i == 0 else "",
                        vm.vm,
                        vm.vmid[:8] or "-",
                        "-" if vm.sequence is None else str(vm.sequence),
                        "-" if vm.generation is None else str(vm.generation),
                        f"{step.seconds:.2f}" if i == 0 else "",
                    )
                )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        kind = "dry run" if self.dry_run else "run"
        verdict = "ready" if self.dry_run and self.ok else "done" if self.ok else "STOPPED"
        if self.stopped_at is not None:
            verdict += f" at group {self.stopped_at}"
        lines.append(f"plan {self.plan} ({self.mode} failover, {kind}): {verdict}")
        for step in self.steps:
            lines += [f"  {step.group}: {p}" for p in step.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

"""``frctl plan ...``: recovery plans (``node/recovery_plan``, ``docs/recovery-plans.md``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MODES = ("test", "unplanned", "prepare", "planned")


def _load(args: argparse.Namespace) -> Any:
    from frlink.config import ConfigError
    from node.recovery_plan import load_plan

    try:
        return load_plan(Path(args.plan))
    except ConfigError as exc:
        print(f"frctl: plan: {exc}", file=sys.stderr)
        return None


def _show(args: argparse.Namespace, report: Any) -> int:
    print(json.dumps(report.to_json()) if args.json else report.table())
    return 0 if report.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from node.recovery_plan import Mode
    from node.recovery_plan.check import check_plan

    plan = _load(args)
    if plan is None:
        return 2
    prepared = Path(args.prepared) if args.prepared else None
    return _show(args, check_plan(plan, Mode(args.mode), prepared=prepared))


def _cmd_run(args: argparse.Namespace) -> int:
    from node.recovery_plan import Mode, run_plan

    if args.dry_run:
        return _cmd_check(args)
    plan = _load(args)
    if plan is None:
        return 2
    prepared = Path(args.prepared) if args.prepared else None
    return _show(args, run_plan(plan, Mode(args.mode), prepared=prepared))


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from node.recovery_plan.run import clean_up_test

    plan = _load(args)
    if plan is None:
        return 2
    return _show(args, clean_up_test(plan))


def _cmd_capture(args: argparse.Namespace) -> int:
    """A group capture of the plan's VMs at the primary, then one cycle each (sent)."""
    import trio

    from node.primary.config import load_primary_config
    from node.primary.group_capture import GroupNotReady, replicate_group
    from node.primary.operations import NotEnabled, find_vm, replicator_for
    from node.primary.state import PrimaryStateStore
    from node.recovery_plan.hooks import StepFailed, run_hook

    plan = _load(args)
    if plan is None:
        return 2
    if plan.primary_config is None:
        print(f"frctl: plan: {plan.path}: [plan] primary_config is needed", file=sys.stderr)
        return 2
    config = load_primary_config(plan.primary_config)
    store = PrimaryStateStore(config.state_dir)
    env = {"FRREP_PLAN": plan.name, "FRREP_MODE": "capture"}

    def hook(command: str | None) -> Any:
        if not command:
            return None
        return lambda: run_hook("hook", command, env, timeout=60.0, cwd=plan.path.parent)

    try:
        reps = [replicator_for(config, find_vm(store, vm).vmid) for vm in plan.vms]
        point = trio.run(
            lambda: replicate_group(reps, freeze=hook(args.freeze), thaw=hook(args.thaw))
        )
    except (GroupNotReady, NotEnabled, StepFailed) as exc:
        print(f"frctl: plan capture: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the network, TLS, the server: say why
        print(f"frctl: plan capture: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(point.to_json()))
    else:
        print(
            f"plan {plan.name}: {len(point.sequences)} VMs captured at one moment "
            f"({point.captured_at_ms} ms) and sent: "
            + ", ".join(f"{vmid[:8]}@{seq}" for vmid, seq in point.sequences.items())
        )
    return 0


def register(sub: Any) -> None:
    """Add ``plan`` to frctl's subcommands."""
    plan = sub.add_parser("plan", help="recovery plans: VMs failed over together, in order")
    psub = plan.add_subparsers(dest="plan_command", required=True, metavar="ACTION")
    for name, helptext, func in (
        ("check", "dry run: check everything a run needs, change nothing", _cmd_check),
        ("run", "fail the plan's VMs over, boot group by boot group", _cmd_run),
    ):
        p = psub.add_parser(name, help=helptext)
        p.add_argument("plan", help="the plan file (TOML)")
        p.add_argument("--mode", choices=MODES, required=True)
        p.add_argument("--prepared", help="planned: the sequences prepare recorded")
        p.add_argument("--json", action="store_true", help="the report as one JSON object")
        if name == "run":
            p.add_argument("--dry-run", action="store_true", help="as 'check'")
        p.set_defaults(func=func, dry_run=False)
    cleanup = psub.add_parser("cleanup", help="remove the plan's test failovers")
    cleanup.add_argument("plan")
    cleanup.add_argument("--json", action="store_true")
    cleanup.set_defaults(func=_cmd_cleanup)
    capture = psub.add_parser(
        "capture", help="at the primary: capture the plan's VMs at one moment, and send"
    )
    capture.add_argument("plan")
    capture.add_argument("--freeze", help="hook: a shell command that pauses the VMs")
    capture.add_argument("--thaw", help="hook: a shell command that resumes them")
    capture.add_argument("--json", action="store_true")
    capture.set_defaults(func=_cmd_capture)

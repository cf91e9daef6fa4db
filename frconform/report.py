"""A run's report: a table for people, JSON and JUnit XML for CI systems."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from typing import Any

from .runner import Report, Verdict
from .scenario import KIND_NAMES, Status

_WIDTH = 100


def _kind(report: Report) -> str:
    return KIND_NAMES[report.kind] if report.kind is not None else "unknown"


def table(report: Report, *, verbose: bool = False) -> str:
    """One line per requirement, then what failed (with the transcript), then totals.

    Not-applicable requirements are listed with their reason only with ``verbose``.
    """
    lines = [
        f"frconform: {report.endpoint}, {_kind(report)}: {report.scenarios_run} scenarios "
        f"in {report.seconds:.1f} s",
        "",
        f"{'ID':<8} {'RESULT':<7} REQUIREMENT",
    ]
    for v in report.verdicts:
        if v.status is Status.NOT_APPLICABLE and not verbose:
            continue
        text = textwrap.shorten(v.requirement.text, _WIDTH - 17, placeholder="...")
        lines.append(f"{v.requirement.id:<8} {v.status.value:<7} {text}")
        if v.status is Status.NOT_APPLICABLE:
            lines.append(f"{'':<16} ({v.reason})")
    failed = [v for v in report.verdicts if v.status is Status.FAILED]
    for v in failed:
        lines += ["", f"FAILED {v.requirement.id}: {v.requirement.text}"]
        for check in v.failures:
            lines.append(f"  in scenario {check.scenario}: {check.detail}")
            lines += [f"    {line}" for line in check.transcript[-12:]]
    for name, error in report.errors:
        lines += ["", f"ERROR in scenario {name}: {error}"]
    for left in report.leftovers:
        lines += ["", f"LEFT BEHIND: {left}"]
    lines += [
        "",
        f"{report.count(Status.PASSED)} passed, {report.count(Status.FAILED)} failed, "
        f"{report.count(Status.NOT_APPLICABLE)} not applicable"
        + ("" if verbose else " (--verbose lists them)")
        + f"; {len(report.errors)} scenario errors; "
        + ("cleaned up" if not report.leftovers else f"{len(report.leftovers)} VMs left"),
    ]
    return "\n".join(lines)


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "id": v.requirement.id,
        "status": v.status.value,
        "level": v.requirement.level,
        "subject": v.requirement.subject,
        "section": v.requirement.section,
        "text": v.requirement.text,
        "reason": v.reason,
        "checks": [
            {
                "scenario": c.scenario,
                "status": c.status.value,
                "detail": c.detail,
                "transcript": list(c.transcript),
            }
            for c in v.checks
        ],
    }


def to_json(report: Report) -> dict[str, Any]:
    """Everything, for machines."""
    return {
        "endpoint": report.endpoint,
        "kind": report.kind.name if report.kind is not None else None,
        "ok": report.ok,
        "seconds": round(report.seconds, 3),
        "scenarios_run": report.scenarios_run,
        "totals": {s.value: report.count(s) for s in Status},
        "requirements": [_verdict_json(v) for v in report.verdicts],
        "errors": [{"scenario": n, "error": e} for n, e in report.errors],
        "leftovers": report.leftovers,
    }


def junit(report: Report) -> str:
    """JUnit XML: one test case per requirement (n/a ones are skipped), one per scenario
    error, one for the cleanup."""
    suite = ET.Element(
        "testsuite",
        name=f"frconform {report.endpoint}",
        tests=str(len(report.verdicts) + len(report.errors) + 1),
        failures=str(report.count(Status.FAILED) + len(report.errors) + bool(report.leftovers)),
        skipped=str(report.count(Status.NOT_APPLICABLE)),
        time=f"{report.seconds:.3f}",
    )
    for v in report.verdicts:
        case = ET.SubElement(
            suite, "testcase", classname=f"frconform.{v.requirement.id.split('-')[0]}"
        )
        case.set("name", f"{v.requirement.id} {v.requirement.text}")
        if v.status is Status.FAILED:
            detail = "\n\n".join(
                f"scenario {c.scenario}: {c.detail}\n" + "\n".join(c.transcript) for c in v.failures
            )
            failure = ET.SubElement(case, "failure", message=v.failures[0].detail)
            failure.text = detail
        elif v.status is Status.NOT_APPLICABLE:
            ET.SubElement(case, "skipped", message=v.reason)
    for name, error in report.errors:
        case = ET.SubElement(suite, "testcase", classname="frconform.scenario", name=name)
        ET.SubElement(case, "error", message=error)
    cleanup = ET.SubElement(suite, "testcase", classname="frconform.run", name="cleanup")
    if report.leftovers:
        failure = ET.SubElement(cleanup, "failure", message="VMs left behind")
        failure.text = "\n".join(report.leftovers)
    text: str = ET.tostring(suite, encoding="unicode", xml_declaration=True)
    return text

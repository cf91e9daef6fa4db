"""The harness's registry and verdicts, without an endpoint: every id a scenario checks is
a requirement of docs/protocol.md, every recovery-side error vector is a scenario, and a
requirement's verdict is the worst of its checks."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import frconform.runner  # noqa: F401  (registers the scenarios)
from frconform.report import junit, table, to_json
from frconform.requirements import Requirement, load_requirements
from frconform.runner import Report, verdicts
from frconform.scenario import SCENARIOS, Check, Status
from frconform.scenarios.malformed import CASE_REQUIREMENT, load_cases


def test_every_id_a_scenario_checks_is_a_requirement_of_the_document() -> None:
    ids = set(load_requirements())
    unknown = {(s.name, r) for s in SCENARIOS for r in s.requirements if r not in ids}
    assert unknown == set()


def test_every_recovery_side_error_vector_is_a_scenario_of_its_own() -> None:
    cases = list(load_cases())
    assert len(cases) > 80
    names = {s.name for s in SCENARIOS}
    assert {f"vector {c.key}" for c in cases} <= names
    assert set(CASE_REQUIREMENT) <= {c.key for c in cases}  # no stale overrides


def test_scenario_names_are_unique() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))


def _req(rid: str, subject: str = "recovery server") -> Requirement:
    return Requirement(rid, f"A {subject} MUST do {rid}.", "MUST", subject, "10.1")


def test_a_verdict_is_the_worst_of_its_checks() -> None:
    reqs = {r.id: r for r in (_req("A-1"), _req("A-2"), _req("A-3"), _req("A-4", "primary"))}
    checks = [
        Check("A-1", "s1", Status.PASSED),
        Check("A-1", "s2", Status.FAILED, "expected X; got Y", ("-> a", "<- b")),
        Check("A-2", "s1", Status.PASSED),
        Check("A-2", "s3", Status.NOT_APPLICABLE, "not reached"),
        Check("A-3", "s4", Status.NOT_APPLICABLE, "applies to a clustering broker"),
    ]
    got = {v.requirement.id: (v.status, v.reason) for v in verdicts(reqs, checks)}
    assert got["A-1"][0] is Status.FAILED
    assert got["A-2"][0] is Status.PASSED
    assert got["A-3"] == (Status.NOT_APPLICABLE, "applies to a clustering broker")
    assert got["A-4"][0] is Status.NOT_APPLICABLE
    assert "binds the primary" in got["A-4"][1]
    only = verdicts(reqs, checks, only=["A-2"])
    assert [v.requirement.id for v in only] == ["A-2"]


def test_the_reports_carry_the_failures_and_their_transcripts() -> None:
    reqs = {r.id: r for r in (_req("A-1"), _req("A-2"))}
    checks = [
        Check("A-1", "s1", Status.FAILED, "expected Error BAD_VALUE; got Ack", ("-> 00ff",)),
        Check("A-2", "s1", Status.PASSED),
    ]
    report = Report("r1 (127.0.0.2:7443)", None, verdicts(reqs, checks), [], [], 1, 0.5)
    assert not report.ok
    text = table(report)
    assert "FAILED A-1" in text
    assert "-> 00ff" in text
    assert "1 passed, 1 failed" in text
    doc = to_json(report)
    assert json.loads(json.dumps(doc))["totals"] == {"passed": 1, "failed": 1, "n/a": 0}
    suite = ET.fromstring(junit(report))
    assert suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert failure is not None
    assert "-> 00ff" in (failure.text or "")

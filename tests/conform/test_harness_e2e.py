"""The conformance harness against our own endpoints (real processes on loopback): a
stand-alone recovery server through ``frctl conform``, and a cluster's CAP; both fully
green, and nothing of the run left behind. Then a deliberately faulty server: exactly
the requirements it breaks fail."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import trio

import frproto as fp
from broker.records import VMRecord
from broker.store import open_store
from frconform.runner import Report, run
from frconform.scenario import Options, Status
from frconform.wire import Target, client_context
from frlink.certs import issue_host_cert
from frtesting.cluster import (
    CAP_ADDRESS,
    CAP_NAME,
    OTHER_GROUP_NAME,
    PRIMARY_NAME,
    ClusterSite,
    node_address,
    node_name,
)
from frtesting.server import start_server_process
from tests.node.site import SERVER_HOST, SERVER_NAME, Site

REPO = Path(__file__).resolve().parents[2]
#: A certificate name the endpoints under test do not authorize.
INTRUDER = "intruder.elsewhere.example.org"
#: The stand-alone server's second trust group, with storage of its own (REP-33).
OTHER_GROUP = f"""
[[authorization]]
primary = "{OTHER_GROUP_NAME}"
storage = "replicas-other"
trust_group = "site-b"
"""


def _replicas(storage: Path) -> list[str]:
    """The replica directories a storage holds (named by VMID), but the one the planned
    failover scenario took over (failed over: the harness, its former primary, may not
    remove it; the endpoint's operator does)."""
    if not storage.is_dir():
        return []
    out = []
    for path in storage.iterdir():
        try:
            uuid.UUID(path.name)
        except ValueError:
            continue
        if _failed_over(path):
            continue
        out.append(path.name)
    return out


def _failed_over(replica: Path) -> bool:
    state = replica / "state.json"
    return state.is_file() and bool(json.loads(state.read_text()).get("failed_over"))


def _failed(report: Report) -> set[str]:
    return {v.requirement.id for v in report.verdicts if v.status is Status.FAILED}


def _passed(report: Report) -> set[str]:
    return {v.requirement.id for v in report.verdicts if v.status is Status.PASSED}


#: Small deadlines and bounds for the stand-alone server under the harness (TIM-*): the
#: harness is told them, and checks each.
DEADLINE = 3.0
MAX_PER_ADDRESS = 40
CONNECTIONS = f"""
negotiate_timeout = {DEADLINE}
ready_timeout = {DEADLINE}
session_timeout = {DEADLINE}
frame_timeout = {DEADLINE}
max = 256
max_per_address = {MAX_PER_ADDRESS}
max_negotiating = 128
"""


def test_a_standalone_server_passes_every_applicable_requirement(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.write_server_config(connections=CONNECTIONS, authorization=OTHER_GROUP)
    server = site.start_server()
    junit_file = tmp_path / "conform.xml"
    # A certificate of the server's CA that no authorization entry names (TLS-4, NEG-12).
    issue_host_cert(site.certs, site.certs, INTRUDER)
    # A primary of another trust group (BRK-4, REP-9, REP-33).
    issue_host_cert(site.certs, site.certs, OTHER_GROUP_NAME)
    try:
        certs = site.certs
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "frctl.main",
                "conform",
                f"{SERVER_HOST}:{server.port}",
                "--name",
                SERVER_NAME,
                "--cert",
                str(certs / f"{PRIMARY_NAME}.pem"),
                "--key",
                str(certs / f"{PRIMARY_NAME}-key.pem"),
                "--ca",
                str(certs / "ca.pem"),
                "--unauthorized-cert",
                str(certs / f"{INTRUDER}.pem"),
                "--unauthorized-key",
                str(certs / f"{INTRUDER}-key.pem"),
                "--other-group-cert",
                str(certs / f"{OTHER_GROUP_NAME}.pem"),
                "--other-group-key",
                str(certs / f"{OTHER_GROUP_NAME}-key.pem"),
                "--json",
                "--junit",
                str(junit_file),
                "--negotiate-timeout",
                str(DEADLINE),
                "--ready-timeout",
                str(DEADLINE),
                "--session-timeout",
                str(DEADLINE),
                "--frame-timeout",
                str(DEADLINE),
                "--max-per-address",
                str(MAX_PER_ADDRESS),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            check=False,
        )
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["kind"] == "STANDALONE"
    totals = report["totals"]
    assert totals["failed"] == 0
    assert totals["passed"] >= 60  # every area: negotiation, session, malformed input
    statuses = {r["id"]: r["status"] for r in report["requirements"]}
    required = ("NEG-2", "NEG-7", "NEG-12", "TLS-4", "TLS-12", "REP-4", "REP-18", "REP-20")
    for rid in (*required, "ENV-4", "SES-9", "DEL-3", "REP-9", "REP-33", "FOV-11"):
        assert statuses[rid] == "passed", rid
    # The other trust group's storage got nothing (REP-33).
    assert _replicas(tmp_path / "replicas-other") == []
    # The stream ended inside a frame (the vectors with "eof"), by TLS's close_notify:
    # the endpoint answers TRUNCATED; these ran, none was set aside as not applicable.
    env5 = next(r for r in report["requirements"] if r["id"] == "ENV-5")
    assert env5["status"] == "passed"
    ran = {c["scenario"] for c in env5["checks"] if c["status"] == "passed"}
    assert {
        f"vector TRUNCATED/{n}" for n in ("envelope_at_eof", "body_at_eof", "after_a_good_frame")
    } <= ran, ran
    # The deadlines and the bound per address, with the values the harness was given.
    for rid in ("TIM-1", "TIM-2", "TIM-3", "TIM-4", "TIM-5", "TIM-6", "TIM-10", "TIM-12"):
        assert statuses[rid] == "passed", rid
    # Broker requirements are not applicable to a stand-alone server, with the reason.
    brk = next(r for r in report["requirements"] if r["id"] == "BRK-1")
    assert brk["status"] == "n/a"
    assert "clustering broker" in brk["reason"]
    # Cleaned up: the server holds no replica of the run.
    assert report["leftovers"] == []
    assert _replicas(site.storage) == []
    # JUnit XML for CI systems: every requirement a test case, none failed.
    suite = ET.parse(junit_file).getroot()
    assert suite.tag == "testsuite"
    assert suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == len(report["requirements"]) + 1


#: What the harness is told of those deadlines and bounds.
TIMES = Options(
    negotiate_timeout=DEADLINE,
    ready_timeout=DEADLINE,
    session_timeout=DEADLINE,
    frame_timeout=DEADLINE,
    max_per_address=MAX_PER_ADDRESS,
)


def test_a_clusters_cap_passes_broker_and_node_requirements(tmp_path: Path) -> None:
    site = ClusterSite(tmp_path, nodes=2, connections=CONNECTIONS)
    try:
        site.start_all()
        site.authorize_primary(other_group=True)
        deleted = VMRecord(str(uuid.uuid4()), node_name(1), "replicas", deleted=True)

        async def main() -> tuple[Report, Report, list[VMRecord]]:
            async with open_store(site.store_url) as store:
                await store.put(site.keys.vm(deleted.vmid), deleted.to_json())
            certs = site.certs
            context = client_context(
                certs / f"{PRIMARY_NAME}.pem", certs / f"{PRIMARY_NAME}-key.pem", certs / "ca.pem"
            )
            hosts = {node_name(i): node_address(i) for i in (1, 2)}
            no_sni = client_context(
                certs / f"{PRIMARY_NAME}.pem",
                certs / f"{PRIMARY_NAME}-key.pem",
                certs / "ca.pem",
                check_name=False,
            )
            target = Target(
                CAP_ADDRESS,
                site.cap_port,
                CAP_NAME,
                context,
                hosts,
                timeout=10,
                no_sni_context=no_sni,
            )
            issue_host_cert(certs, certs, INTRUDER)
            intruder = client_context(
                certs / f"{INTRUDER}.pem", certs / f"{INTRUDER}-key.pem", certs / "ca.pem"
            )
            other_group = client_context(
                certs / f"{OTHER_GROUP_NAME}.pem",
                certs / f"{OTHER_GROUP_NAME}-key.pem",
                certs / "ca.pem",
            )
            options = replace(
                TIMES,
                deleted_vmid=uuid.UUID(deleted.vmid),
                unauthorized_cert=intruder,
                other_group_cert=other_group,
            )
            report = await run(target, options)
            # A node reached directly: what a node does on its own (no new VMs there).
            node = Target(
                node_address(1), site.running[1].port, node_name(1), context, no_sni_context=no_sni
            )
            at_node = await run(node, TIMES)
            async with open_store(site.store_url) as store:
                kvs, _ = await store.range(site.keys.vms)
            return report, at_node, [VMRecord.from_json(kv.value) for kv in kvs]

        report, at_node, records = trio.run(main)
    finally:
        site.stop_all()
    failures = [(v.requirement.id, [c.detail for c in v.failures]) for v in report.verdicts]
    assert _failed(report) == set(), [f for f in failures if f[1]]
    assert report.errors == []
    assert report.ok
    passed = _passed(report)
    for rid in (
        "BRK-1",
        "BRK-2",
        "BRK-3",
        "TLS-4",
        "TLS-5",
        "SM-4",
        "REP-5",
        "REP-18",
        "DEL-3",
        "FOV-11",
    ):
        assert rid in passed, rid
    # A primary of another trust group, at the broker and at the VM's node.
    for rid in ("BRK-4", "REP-9", "REP-33"):
        assert rid in passed, rid
    for rid in ("NEG-2", "NEG-12", "TLS-12"):
        assert rid in passed, rid
    # The deadlines at the broker (the CAP's listener) and at the node a VM is placed on
    # (TIM-4 runs there), and the bound per address at each listener.
    tim = {"TIM-1", "TIM-2", "TIM-3", "TIM-4", "TIM-5", "TIM-6", "TIM-10", "TIM-12"}
    assert tim <= passed
    assert tim - {"TIM-4"} <= _passed(at_node)
    assert at_node.ok
    assert at_node.kind is fp.RecoveryType.CLUSTER_NODE
    assert {"REP-5", "SM-3", "NEG-2", "ERR-9", "TLS-12"} <= _passed(at_node)
    # Cleaned up: only the administrator's deleted record is left, no replica anywhere.
    # (and the VM the planned-failover scenario took over, failed over at its node).
    left = [r.vmid for r in records if r.failover != "done"]
    assert left == [deleted.vmid]
    for i in (1, 2):
        assert _replicas(site.storage(i) / "replicas") == []
        assert _replicas(site.storage(i) / "replicas-other") == []


def test_a_faulty_server_fails_exactly_the_requirements_it_breaks(tmp_path: Path) -> None:
    site = Site(tmp_path)
    server = start_server_process(
        site.server_config, tmp_path, module="tests.conform.faulty_server"
    )
    try:
        certs = site.certs
        context = client_context(
            certs / f"{PRIMARY_NAME}.pem", certs / f"{PRIMARY_NAME}-key.pem", certs / "ca.pem"
        )
        no_sni = client_context(
            certs / f"{PRIMARY_NAME}.pem",
            certs / f"{PRIMARY_NAME}-key.pem",
            certs / "ca.pem",
            check_name=False,
        )
        target = Target(
            SERVER_HOST, server.port, SERVER_NAME, context, timeout=3, no_sni_context=no_sni
        )
        report = trio.run(run, target)
    finally:
        server.stop()
    # Wrong error code (REP-4, and DEL-2's unknown-afterwards), a control frame over the
    # limit accepted (ENV-4), a foreign major version taken as ours: the server's own
    # Connection will not send the inconsistent answer, so the connection just ends, for
    # 2.0 (NEG-2) as for 0.0 and 255.255 (MSG-4: never refused for its version).
    # A connection without SNI answered as a broker (TLS-12).
    # RelationshipAccepted at generation 0 with a resume point of (0, 0) whatever the IR's
    # state (REP-24, REP-26), an IR recorded at sequence 0 (REP-25), IR progress forgotten
    # when the connection is lost (REP-27), a resent create with a new name refused (REP-28).
    assert _failed(report) == {
        "REP-4",
        "DEL-2",
        "ENV-4",
        "NEG-2",
        "MSG-4",
        "TLS-12",
        "REP-24",
        "REP-25",
        "REP-26",
        "REP-27",
        "REP-28",
        # Its RelationshipAccepted says generation 0 (REP-24): the FailoverDone of the
        # relationship's real next generation is not the one after what it said.
        "FOV-7",
        # No repeat-only mode: the former primary is refused at the generation it knew.
        "FOV-11",
    }
    assert not report.ok
    env4 = next(v for v in report.verdicts if v.requirement.id == "ENV-4")
    detail = " ".join(c.detail for c in env4.failures)
    assert "no answer" in detail  # it waited for the body instead of refusing it
    neg2 = next(v for v in report.verdicts if v.requirement.id == "NEG-2")
    assert neg2.failures[0].transcript  # what was sent and received is in the report

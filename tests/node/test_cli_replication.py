"""The replication CLI as an operator uses it: enable, run the primary service, watch the
IR progress, status, pause/resume, disable — real processes on loopback."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from .site import Site

MIB = 1024 * 1024


def frctl(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_enable_wait_status_pause_resume_disable(site: Site) -> None:
    server = site.start_server()
    config = str(site.write_primary_config())
    image = site.root / "disk0.img"
    image.write_bytes(random.Random(1).randbytes(12 * MIB))
    vmid = str(uuid.UUID(int=random.Random(2).getrandbits(128), version=4))
    enabled = frctl(
        "replication",
        "enable",
        "--config",
        config,
        "--vmid",
        vmid,
        "--name",
        "web01",
        "--disk",
        f"disk0={image}",
        "--server",
        f"127.0.0.2:{server.port}",
        "--server-name",
        "r1.example.com",
        "--frequency",
        "1s",
        "--bandwidth",
        "6M",
    )
    assert enabled.returncode == 0, enabled.stderr
    assert enabled.stdout.strip() == "replication/web01 enabled"
    before = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)
    assert before["vms"][0]["state"] == "initial replication"
    assert before["vms"][0]["ir_percent"] == 0.0
    # Nobody replicates it yet: status says so, whatever the state file holds.
    assert before["vms"][0]["health"] == "critical"
    assert before["vms"][0]["reasons"][0]["code"] == "service-not-running"
    assert before["service"]["running"] is False
    primary = subprocess.Popen(
        [sys.executable, "-m", "frctl.main", "primary", "run", "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=(site.root / "primary.log").open("ab"),
        stdin=subprocess.DEVNULL,
    )
    try:
        # 12 MiB at 6 MB/s: a couple of seconds of IR, watched through `wait`.
        waited = frctl("replication", "wait", "--config", config, vmid, "--json", "--timeout", "60")
        assert waited.returncode == 0, waited.stderr
        lines = [json.loads(line) for line in waited.stdout.splitlines() if line.startswith("{")]
        percents = [line["ir_percent"] for line in lines]
        assert percents[-1] == 100.0
        assert any(0 < p < 100 for p in percents), percents  # progress was visible
        assert waited.stdout.strip().endswith("replication/web01 in sync at sequence 0")
        doc = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)
        status = doc["vms"]
        assert (status[0]["state"], status[0]["health"]) == ("replicating", "normal"), status
        assert status[0]["ir"] == "COMPLETE"
        assert status[0]["lag_seconds"] is not None
        assert doc["service"]["running"] is True
        assert doc["service"]["pid"] == primary.pid
        assert frctl("replication", "status", "--config", config, "--check").returncode == 0
        table = frctl("replication", "status", "--config", config).stdout
        assert "web01" in table
        assert "100%" in table

        # The recovery server's side: the replica and its recovery points.
        server_config = str(site.server_config)
        replicas = json.loads(frctl("replica", "list", "--config", server_config, "--json").stdout)
        assert [(r["name"], r["ir"], r["applied_sequence"]) for r in replicas] == [
            ("web01", "COMPLETE", 0)
        ]
        assert replicas[0]["primary"] == "p1.primary.example.com"
        assert replicas[0]["trust_group"] == "site-a"
        points = json.loads(
            frctl("replica", "points", "--config", server_config, "web01", "--json").stdout
        )
        assert [p["sequence"] for p in points] == [0]
        unknown = frctl("replica", "points", "--config", server_config, str(uuid.uuid4()))
        assert unknown.returncode == 4
        assert "no replica" in unknown.stderr

        # A VM by name everywhere a VMID is taken (verify, resync, replica points).
        verified = frctl("replication", "verify", "--config", config, "web01", "--json")
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["ok"] is True
        refused = frctl("replication", "resync", "--config", config, "web01")
        assert refused.returncode == 1
        assert "pause" in refused.stderr

        assert frctl("replication", "pause", "--config", config, vmid).stdout.strip() == (
            "replication/web01 paused"
        )
        paused = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)
        assert paused["vms"][0]["state"] == "paused"
        assert paused["vms"][0]["health"] == "warning"
        resynced = frctl("replication", "resync", "--config", config, "web01", "--json")
        assert resynced.returncode == 0, resynced.stderr
        assert json.loads(resynced.stdout)["blocks"] > 0
        assert "resynchronizing web01: 100%" in resynced.stderr
        assert frctl("replication", "resume", "--config", config, vmid).returncode == 0
        assert frctl("replication", "disable", "--config", config, vmid).returncode == 0
        gone = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)
        assert gone["vms"] == []
    finally:
        primary.send_signal(signal.SIGINT)
        try:
            primary.wait(timeout=10)
        except subprocess.TimeoutExpired:
            primary.kill()
        server.stop()
    assert site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()


def test_enable_refuses_bad_input(site: Site, tmp_path: Path) -> None:
    config = str(site.write_primary_config())
    missing = frctl(
        "replication",
        "enable",
        "--config",
        config,
        "--vmid",
        str(uuid.uuid4()),
        "--name",
        "vm",
        "--disk",
        f"disk0={tmp_path / 'nope.img'}",
        "--server",
        "127.0.0.2:1",
    )
    assert missing.returncode == 1
    assert "existing image" in missing.stderr
    bad_rate = frctl(
        "replication",
        "enable",
        "--config",
        config,
        "--vmid",
        str(uuid.uuid4()),
        "--name",
        "vm",
        "--disk",
        "disk0=x",
        "--server",
        "h:1",
        "--bandwidth",
        "-5M",
    )
    assert bad_rate.returncode == 2

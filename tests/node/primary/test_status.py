"""Status judged on read (node/primary/status.py): each health an operator sees, made
true and made false, from plain values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from node.primary.heartbeat import (
    Heartbeat,
    beat,
    heartbeat_path,
    pid_alive,
    read_heartbeat,
    this_host,
)
from node.primary.operations import replication_status
from node.primary.state import FailureKind, IRStage, PrimaryStateStore, VMReplicationState
from node.primary.status import (
    RUNNING_HERE,
    Counters,
    ServiceLiveness,
    Severity,
    duration,
    report,
    rfc3339,
    service_liveness,
    vm_status,
)

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
VMID = "00000000-0000-4000-8000-000000000001"
NOT_RUNNING = ServiceLiveness(running=False, detail="no heartbeat")


def vm(**fields: Any) -> VMReplicationState:
    """A VM replicating every 5 minutes, in sync a minute ago, unless ``fields`` say."""
    state = VMReplicationState(
        vmid=VMID,
        name="web01",
        disks=[{"disk_id": "disk0", "path": "/x", "size": 1 << 20}],
        frequency_s=300.0,
        ir_state=IRStage.COMPLETE,
        last_replicated_at=NOW - 3600,
        last_synced_at=NOW - 60,
    )
    for name, value in fields.items():
        setattr(state, name, value)
    return state


CASES: list[tuple[str, dict[str, Any], ServiceLiveness, bool, str, str]] = [
    # (case, state fields, service, overflowed, state, health text)
    (
        "idle and in sync: the last ack is old, the last cycle confirmed it current",
        {},
        RUNNING_HERE,
        False,
        "replicating",
        "normal",
    ),
    (
        "late: no cycle confirmed it for over twice the interval",
        {"last_synced_at": NOW - 720},
        RUNNING_HERE,
        False,
        "replicating",
        "warning: lag 12m over 2x the 5m interval",
    ),
    (
        "exactly twice the interval is not yet late",
        {"last_synced_at": NOW - 600},
        RUNNING_HERE,
        False,
        "replicating",
        "normal",
    ),
    (
        "a recent ack counts as much as a confirmed cycle",
        {"last_synced_at": NOW - 7200, "last_replicated_at": NOW - 30},
        RUNNING_HERE,
        False,
        "replicating",
        "normal",
    ),
    (
        "an older state file with neither time: no lag known, no warning",
        {"last_synced_at": None, "last_replicated_at": None},
        RUNNING_HERE,
        False,
        "replicating",
        "normal",
    ),
    (
        "the service does not run",
        {},
        NOT_RUNNING,
        False,
        "replicating",
        "critical: primary service not running (no heartbeat)",
    ),
    (
        "the service does not run during an IR",
        {"ir_state": IRStage.IN_PROGRESS},
        NOT_RUNNING,
        False,
        "initial replication",
        "critical: primary service not running (no heartbeat)",
    ),
    (
        "an IR going on with the service running",
        {"ir_state": IRStage.IN_PROGRESS, "last_synced_at": None, "last_replicated_at": None},
        RUNNING_HERE,
        False,
        "initial replication",
        "normal",
    ),
    (
        "paused: a warning whether or not the service runs",
        {"paused": True, "last_synced_at": NOW - 7200},
        NOT_RUNNING,
        False,
        "paused",
        "warning: paused by an administrator: not replicating (frctl replication resume)",
    ),
    (
        "the pending log passed its bound",
        {"pending_bytes": 4096},
        RUNNING_HERE,
        True,
        "replicating",
        "critical: pending log over its bound (4096 bytes kept): the next cycle resynchronizes",
    ),
    (
        "the server cannot be reached",
        {
            "last_error": "OSError: connection refused",
            "last_error_kind": FailureKind.UNREACHABLE,
            "unreachable_since": NOW - 30,
        },
        RUNNING_HERE,
        False,
        "replicating",
        "warning: server unreachable since 2027-01-15T07:59:30Z: OSError: connection refused",
    ),
    (
        "unreachable for long: both reasons, in one line",
        {
            "last_error": "OSError: connection refused",
            "last_error_kind": FailureKind.UNREACHABLE,
            "unreachable_since": NOW - 900,
            "last_synced_at": NOW - 900,
        },
        RUNNING_HERE,
        False,
        "replicating",
        "warning: server unreachable since 2027-01-15T07:45:00Z: OSError: connection refused; "
        "lag 15m over 2x the 5m interval",
    ),
    (
        "a disk vanished",
        {"last_error": "disk0: gone", "last_error_kind": FailureKind.DISK},
        RUNNING_HERE,
        False,
        "replicating",
        "critical: disk unavailable: disk0: gone",
    ),
    (
        "the server refused the cycle",
        {"last_error": "Busy: later", "last_error_kind": FailureKind.REFUSED},
        RUNNING_HERE,
        False,
        "replicating",
        "warning: last cycle failed: Busy: later",
    ),
    (
        "halted: waits for a person, whatever the service",
        {"halted": "disk0 grew", "last_synced_at": NOW - 7200},
        NOT_RUNNING,
        True,
        "halted",
        "critical: halted: disk0 grew",
    ),
    (
        "critical reasons come before warnings",
        {"last_synced_at": NOW - 7200},
        NOT_RUNNING,
        False,
        "replicating",
        "critical: primary service not running (no heartbeat); lag 1h00m over 2x the 5m interval",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "service", "overflowed", "state", "text"), CASES, ids=[c[0] for c in CASES]
)
def test_health_judged_on_read(
    case: str,
    fields: dict[str, Any],
    service: ServiceLiveness,
    overflowed: bool,
    state: str,
    text: str,
) -> None:
    judged = vm_status(vm(**fields), now=NOW, service=service, overflowed=overflowed)
    assert (judged.state, judged.health_text) == (state, text), case
    assert judged.health == text.partition(":")[0]
    assert judged.to_json()["health_text"] == text


def test_lag_is_from_the_later_of_ack_and_confirmed_sync() -> None:
    assert vm_status(vm(), now=NOW, service=RUNNING_HERE, overflowed=False).lag_seconds == 60
    during_ir = vm(ir_state=IRStage.IN_PROGRESS)
    assert vm_status(during_ir, now=NOW, service=RUNNING_HERE, overflowed=False).lag_seconds is None


@pytest.mark.parametrize(
    ("beat_at", "alive", "running", "detail"),
    [
        (NOW - 1, True, True, ""),
        (NOW - 1, None, True, ""),  # written on another host: judged by its age alone
        (None, None, False, "no heartbeat"),
        (NOW - 1, False, False, "its process 41 is gone; last heartbeat 2027-01-15T07:59:59Z"),
        (NOW - 40, True, False, "last heartbeat 40s ago, at 2027-01-15T07:59:20Z"),
        (NOW - 40, None, False, "last heartbeat 40s ago, at 2027-01-15T07:59:20Z"),
    ],
)
def test_service_liveness(
    beat_at: float | None, alive: bool | None, running: bool, detail: str
) -> None:
    heartbeat = None if beat_at is None else Heartbeat(41, "p1", NOW - 100, beat_at, 2.0)
    judged = service_liveness(heartbeat, now=NOW, pid_alive=alive)
    assert (judged.running, judged.detail) == (running, detail)


def test_counters_and_the_roll_up() -> None:
    a = vm(cycles_ok=10, cycles_failed=2, batches_sent=4, batch_bytes_sent=4000)
    a.batch_bytes_max, a.stats_since = 2500, NOW - 50
    b = vm(vmid="00000000-0000-4000-8000-000000000002", name="db01", last_synced_at=NOW - 900)
    b.cycles_ok, b.batches_sent, b.batch_bytes_sent, b.batch_bytes_max = 5, 1, 3000, 3000
    b.stats_since = NOW - 500
    c = vm(vmid="00000000-0000-4000-8000-000000000003", name="app01", halted="x")
    service = ServiceLiveness(running=True, pid=41, host="p1", beat_at=NOW)
    rolled = report([a, b, c], now=NOW, service=service)
    assert [v.name for v in rolled.vms] == ["app01", "db01", "web01"]
    assert rolled.vms[2].counters.average_batch_bytes == 1000
    assert rolled.counters == Counters(15, 2, 5, 7000, 3000, NOW - 500)
    assert rolled.health == "critical"
    counts = [rolled.count(s) for s in (Severity.NORMAL, Severity.WARNING, Severity.CRITICAL)]
    assert counts == [1, 1, 1]
    assert rolled.summary == (
        "primary service: running (pid 41) · VMs 3: 1 normal, 1 warning, 1 critical · worst lag "
        "15m (db01) · cycles 17 (2 failed), 5 batches, 7.0 kB"
    )
    doc = json.loads(json.dumps(rolled.to_json()))
    assert doc["summary"]["worst_lag_vm"] == "db01"
    assert doc["vms"][2]["counters"] == {
        "cycles": 12,
        "successful_cycles": 10,
        "failed_cycles": 2,
        "batches": 4,
        "bytes": 4000,
        "average_batch_bytes": 1000,
        "maximum_batch_bytes": 2500,
        "since": "2027-01-15T07:59:10Z",
    }
    assert doc["vms"][2]["last_acknowledged_at"] == "2027-01-15T07:00:00Z"
    empty = report([], now=NOW, service=NOT_RUNNING)
    assert empty.health == "normal"
    assert "NOT RUNNING (no heartbeat)" in empty.summary


def test_words() -> None:
    assert [duration(s) for s in (0.4, 45, 300, 252, 3900, 93600)] == [
        "0.4s",
        "45s",
        "5m",
        "4m12s",
        "1h05m",
        "1d02h",
    ]
    # Never "lag 2s over 2x the 1s interval" for a lag of 2.04 s.
    assert (duration(1.0), duration(2.04), duration(9.96)) == ("1s", "2.0s", "10.0s")
    assert rfc3339(NOW) == "2027-01-15T08:00:00Z"
    assert rfc3339(None) is None
    assert rfc3339(1e12) == "1000000000000.0 (not a time)"


def test_an_older_state_file_loads_with_the_new_fields_at_their_defaults(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path)
    store.save(vm())
    path = tmp_path / VMID / "state.json"
    doc = json.loads(path.read_text())
    doc["format"] = 1  # written before the checksum (format 2) and these fields
    del doc["checksum"]
    for name in (
        "last_synced_at",
        "last_error_kind",
        "unreachable_since",
        "next_cycle_at",
        "cycles_ok",
        "cycles_failed",
        "batches_sent",
        "batch_bytes_sent",
        "batch_bytes_max",
        "stats_since",
    ):
        del doc[name]
    path.write_text(json.dumps(doc))
    loaded = store.load(VMID)
    assert (loaded.last_synced_at, loaded.cycles_ok, loaded.last_error_kind) == (None, 0, None)
    assert replace(loaded, last_synced_at=NOW - 60) == vm()


async def test_the_heartbeat_is_written_while_running_and_removed_when_stopped(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(beat, tmp_path)  # started once the first beat is written
        first = read_heartbeat(tmp_path)
        assert first is not None
        assert (first.pid, first.host) == (os.getpid(), this_host())
        live = replication_status(tmp_path)
        assert live.service.running, live.service
        nursery.cancel_scope.cancel()
    assert not heartbeat_path(tmp_path).exists()
    gone = replication_status(tmp_path)
    assert (gone.service.running, gone.service.detail) == (False, "no heartbeat")


def test_a_heartbeat_whose_process_is_gone_is_not_a_running_service(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    # Fresh, but its process died.
    stale = Heartbeat(child.pid, this_host(), time.time(), time.time() + 5, 2.0)
    heartbeat_path(tmp_path).write_text(json.dumps(stale.to_json()))
    judged = replication_status(tmp_path).service
    assert not judged.running
    assert f"its process {child.pid} is gone" in judged.detail
    assert pid_alive(os.getpid())
    heartbeat_path(tmp_path).write_text("{not json")
    assert replication_status(tmp_path).service.detail == "no heartbeat"


def test_a_killed_process_not_yet_reaped_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Exited but not reaped: a zombie, as a killed service is until its parent waits.
        deadline = time.monotonic() + 10
        while _state_letter(child.pid) != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def _state_letter(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]

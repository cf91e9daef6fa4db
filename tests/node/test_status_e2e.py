"""Status that tells the truth (issue 14), tried as an operator would: a recovery server
process, a `frctl primary run` process and `frctl replication status|wait`, on loopback.
Each wrong case of the issue, made true and made false:

* an idle VM whose cycles succeed stays normal (it went warning after 2x its interval);
* a VM whose cycles stop succeeding goes warning, with the server's error and since when;
* a killed primary service makes every VM critical (it still read normal, exit 0).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from frtesting.server import child_env

from .site import Site
from .test_cli_replication import frctl
from .test_operator_safety_e2e import MIB, Operator, disk, new_vm, wait_until

FRCTL = (sys.executable, "-m", "frctl.main")
RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
def operator(site: Site) -> Iterator[Operator]:
    op = Operator(site, site.start_server())
    try:
        yield op
    finally:
        op.stop_services()
        op.server.stop()


def status(operator: Operator) -> dict[str, Any]:
    done = frctl("replication", "status", "--config", operator.config, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def check(operator: Operator) -> int:
    return frctl("replication", "status", "--config", operator.config, "--check").returncode


def test_an_idle_vm_in_sync_stays_normal_and_goes_warning_when_its_server_is_gone(
    operator: Operator,
) -> None:
    vmid, _image = operator.replicating(1401, "idle01", 2 * MIB)  # every 1 s
    first = status(operator)["vms"][0]
    acked = first["last_acknowledged_at"]
    # Nothing is written: every cycle finds nothing to send. Well past twice the interval
    # since the last acknowledged batch, the VM is in sync, so normal.
    for _ in range(3):
        time.sleep(1.5)
        row = status(operator)["vms"][0]
        assert (row["state"], row["health"], row["reasons"]) == ("replicating", "normal", [])
        assert row["last_acknowledged_at"] == acked  # idle indeed: no batch was sent
        assert row["lag_seconds"] < 2.0, row
        assert check(operator) == 0
    assert row["counters"]["successful_cycles"] > first["counters"]["successful_cycles"]
    assert row["counters"]["failed_cycles"] == 0
    assert re.fullmatch(RFC3339, row["next_cycle_at"]), row
    table = frctl("replication", "status", "--config", operator.config).stdout
    assert table.startswith("primary service: running (pid ")
    assert "VMs 1: 1 normal, 0 warning, 0 critical" in table

    # The recovery server stops: cycles fail, and past twice the interval the VM is late.
    port = operator.server.port
    operator.server.stop()
    row = wait_until(
        lambda: (
            (r := status(operator)["vms"][0])["health"] == "warning"
            and len(r["reasons"]) == 2
            and r
        ),
        timeout=30,
    )
    codes = [r["code"] for r in row["reasons"]]
    assert codes == ["unreachable", "lag"], row
    assert re.fullmatch(
        rf"warning: server unreachable since ({RFC3339}): \w+: .+; "
        rf"lag [\d.]+s over 2x the 1s interval",
        row["health_text"],
    ), row["health_text"]
    assert row["unreachable_since"] in row["health_text"]
    assert row["counters"]["failed_cycles"] >= 1
    assert check(operator) == 5
    table = frctl("replication", "status", "--config", operator.config).stdout
    assert "warning: server unreachable since " in table
    assert "VMs 1: 0 normal, 1 warning, 0 critical" in table

    # The server is back: so is normal, and the error is gone.
    operator.server = operator.site.start_server(port=port)
    row = wait_until(
        lambda: (r := status(operator)["vms"][0])["health"] == "normal" and r, timeout=60
    )
    assert (row["last_error"], row["unreachable_since"]) == (None, None)
    assert check(operator) == 0
    operator.in_sync(vmid)


def test_a_killed_primary_service_is_critical_and_a_restarted_one_normal(
    operator: Operator,
) -> None:
    rng = random.Random(1403)
    paused_vmid = new_vm(rng)
    image = disk(operator.site.root / "paused01.img", MIB, rng)
    assert (
        operator.enable(paused_vmid, "paused01", f"disk0={image}", frequency="1s").returncode == 0
    )
    vmid, _image = operator.replicating(1402, "kill01", 2 * MIB)
    operator.in_sync(paused_vmid)
    assert frctl("replication", "pause", "--config", operator.config, paused_vmid).returncode == 0
    doc = status(operator)
    assert doc["service"]["running"] is True
    service = operator.services[-1]
    assert doc["service"]["pid"] == service.pid

    service.send_signal(signal.SIGKILL)
    service.wait()
    doc = status(operator)
    assert doc["service"]["running"] is False
    rows = {r["name"]: r for r in doc["vms"]}
    assert rows["kill01"]["health"] == "critical"
    assert rows["kill01"]["health_text"].startswith(
        f"critical: primary service not running (its process {service.pid} is gone; last heartbeat "
    )
    # A paused VM is not replicated either way: it stays a warning, not critical.
    assert rows["paused01"]["health"] == "warning"
    assert check(operator) == 6
    table = frctl("replication", "status", "--config", operator.config).stdout
    assert "primary service: NOT RUNNING" in table
    assert "critical: primary service not running" in table
    waited = frctl(
        "replication", "wait", "--config", operator.config, "kill01", "--service-grace", "0.5"
    )
    assert waited.returncode == 6, waited.stderr
    assert "not in sync: critical: primary service not running" in waited.stderr

    # Started again: normal again (the paused VM stays a warning).
    operator.start_service()
    row = wait_until(
        lambda: (
            (r := status(operator))["service"]["running"]
            and {v["name"]: v for v in r["vms"]}["kill01"]["health"] == "normal"
            and r
        ),
        timeout=30,
    )
    assert row["service"]["pid"] == operator.services[-1].pid
    assert frctl("replication", "resume", "--config", operator.config, paused_vmid).returncode == 0
    wait_until(lambda: check(operator) == 0, timeout=30)
    operator.in_sync(vmid)

    # Stopped the ordinary way, the service takes its heartbeat with it.
    operator.stop_services()
    assert not (operator.site.state_dir / "service.json").exists()
    doc = status(operator)
    assert doc["service"]["detail"] == "no heartbeat"
    assert {r["health"] for r in doc["vms"]} == {"critical"}


def test_watch_redraws_until_interrupted(operator: Operator) -> None:
    operator.replicating(1404, "watch01", MIB)
    watch = subprocess.Popen(
        [*FRCTL, "replication", "status", "--config", operator.config, "--watch", "0.4", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        text=True,
    )
    try:
        assert watch.stdout is not None
        # Four views 0.4 s apart span more than a second: redrawn, not printed once.
        views = [json.loads(watch.stdout.readline()) for _ in range(4)]
        assert [v["vms"][0]["name"] for v in views] == ["watch01"] * 4
        assert len({v["at"] for v in views}) >= 2
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=10) == 0, watch.stderr.read() if watch.stderr else ""
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    plain = subprocess.run(
        [*FRCTL, "replication", "status", "--config", operator.config, "--watch", "0", "--check"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert plain.returncode == 2  # --watch 0 is refused, and so is --watch with --check

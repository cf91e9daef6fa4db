"""Running as a service, seen by an operator's tools: the operations listener of a real
recovery server and a real primary service (``/metrics``, ``/livez``, ``/readyz``),
systemd's readiness datagram, and SIGHUP reloading the server's authorization entries."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.metrics import Response, Samples, get, metrics_url, scrape
from frtesting.server import ServerProcess, child_env

from .site import PRIMARY_HOST, SERVER_HOST, Site

MIB = 1024 * 1024


def _get(url: str) -> Response:
    return get(url, timeout=5)


def _with_metrics(config: Path, host: str) -> None:
    config.write_text(config.read_text() + f'\n[metrics]\nlisten = "{host}:0"\n')


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    _with_metrics(site.server_config, SERVER_HOST)
    proc = site.start_server()
    yield proc
    proc.stop()


def _frctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env=child_env(),
    )


def _wait_for(what: str, check: object, url: str, timeout: float = 30.0) -> Samples:
    """Scrape ``url`` until ``check(samples)`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"{what}: {sorted(samples.values.items())}"
        time.sleep(0.2)


def test_a_replicated_vm_shows_in_both_sides_metrics(site: Site, server: ServerProcess) -> None:
    server_url = metrics_url(server.log.read_text)
    assert _get(f"{server_url}/livez").status == 200
    assert _get(f"{server_url}/readyz").status == 200
    assert _get(f"{server_url}/nothing").status == 404

    config = site.write_primary_config()
    _with_metrics(config, PRIMARY_HOST)
    image = site.root / "disk0.img"
    image.write_bytes(random.Random(1).randbytes(4 * MIB))
    vmid = str(uuid.uuid4())
    enabled = _frctl(
        "replication", "enable", "--config", str(config), "--vmid", vmid, "--name", "web01",
        "--disk", f"disk0={image}", "--server", f"{SERVER_HOST}:{server.port}",
        "--server-name", "r1.example.com", "--frequency", "1s",
    )  # fmt: skip
    assert enabled.returncode == 0, enabled.stderr
    log = site.root / "primary.log"
    with log.open("wb") as out:
        primary = subprocess.Popen(
            [sys.executable, "-m", "frctl.main", "primary", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
    try:
        primary_url = metrics_url(log.read_text)
        # The IR, then a write and a delta cycle that carries it.
        _wait_for("the IR", lambda s: (s.get("frrep_cycles_total") or 0) >= 1, primary_url)
        with image.open("r+b") as f:
            f.seek(MIB)
            f.write(b"x" * 100_000)
        before = scrape(primary_url).get("frrep_cycles_total") or 0
        got = _wait_for(
            "a delta cycle",
            lambda s: (s.get("frrep_cycles_total") or 0) >= before + 2,
            primary_url,
        )
        assert _get(f"{primary_url}/readyz").status == 200
        assert (got.get("frrep_sent_bytes_total") or 0) > 4 * MIB  # the IR at least
        lag = got.get("frrep_vm_lag_seconds", vmid=vmid, vm="web01")
        assert lag is not None
        assert 0 <= lag < 5
        acked = got.get("frrep_vm_last_acknowledged_timestamp_seconds", vmid=vmid)
        assert acked is not None
        assert abs(time.time() - acked) < 5
        assert got.get("frrep_vm_pending_bytes", vmid=vmid) == 0
        assert got.get("frrep_vm_paused", vmid=vmid) == 0
        assert (got.get("frrep_cycle_duration_seconds_count") or 0) >= 2
        expiry = got.get("frrep_certificate_expiry_seconds")
        assert expiry is not None
        assert 300 * 86400 < expiry < 3 * 366 * 86400
        assert "process_resident_memory_bytes" in got.names()
        assert got.get("frrep_failures_total") is None  # nothing failed

        seen = scrape(server_url)
        assert (seen.get("frrep_received_bytes_total") or 0) > 4 * MIB
        assert (seen.get("frrep_batch_apply_duration_seconds_count") or 0) >= 1
        assert (seen.get("frrep_certificate_expiry_seconds") or 0) > 0
        # Connections a primary closed at the end of its cycles are no failures.
        assert seen.get("frrep_failures_total") is None

        # Paused: the gauge says so, read from the state file at scrape time.
        assert _frctl("replication", "pause", "--config", str(config), vmid).returncode == 0
        assert scrape(primary_url).get("frrep_vm_paused", vmid=vmid) == 1
    finally:
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=15) == 0, log.read_text()
    assert "SIGTERM: stopping" in log.read_text()


def test_a_primary_that_cannot_reach_its_server_counts_failures_by_reason(site: Site) -> None:
    config = site.write_primary_config()
    _with_metrics(config, PRIMARY_HOST)
    image = site.root / "disk0.img"
    image.write_bytes(bytes(MIB))
    vmid = str(uuid.uuid4())
    with socket.socket() as s:  # a port nobody listens on
        s.bind((SERVER_HOST, 0))
        port = s.getsockname()[1]
    enabled = _frctl(
        "replication", "enable", "--config", str(config), "--vmid", vmid, "--name", "db01",
        "--disk", f"disk0={image}", "--server", f"{SERVER_HOST}:{port}",
        "--server-name", "r1.example.com", "--frequency", "1s",
    )  # fmt: skip
    assert enabled.returncode == 0, enabled.stderr
    log = site.root / "primary.log"
    with log.open("wb") as out:
        primary = subprocess.Popen(
            [sys.executable, "-m", "frctl.main", "primary", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
    try:
        url = metrics_url(log.read_text)
        got = _wait_for(
            "a failure",
            lambda s: (s.get("frrep_failures_total", reason="unreachable") or 0) >= 1,
            url,
        )
        assert got.get("frrep_cycles_total") == 0
        assert got.get("frrep_vm_lag_seconds", vmid=vmid) is None  # never acknowledged
        # The service runs (ready) even though its VM cannot replicate.
        assert _get(f"{url}/readyz").status == 200
    finally:
        primary.send_signal(signal.SIGTERM)
        primary.wait(timeout=15)


def test_ready_is_notified_to_systemd_once_the_port_accepts(site: Site, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(30)
        log = tmp_path / "server.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "frctl.main", "server", "run", "--config",
                 str(site.server_config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**child_env(), "NOTIFY_SOCKET": str(notify_path)},
            )  # fmt: skip
        try:
            assert notify.recv(1024) == b"READY=1"
            # At that moment the replication port accepts connections.
            text = log.read_text()
            port = int(text.split("listening on ")[1].split(":")[1].split()[0])
            with socket.create_connection((SERVER_HOST, port), timeout=5):
                pass
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(1024) == b"STOPPING=1"
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sighup_reloads_the_authorization_entries(site: Site) -> None:
    # The server starts without an entry for our primary: refused.
    site.write_server_config(primary="*.elsewhere.example.com")
    _with_metrics(site.server_config, SERVER_HOST)
    server = site.start_server()
    try:
        url = metrics_url(server.log.read_text)
        image = site.root / "disk0.img"
        image.write_bytes(random.Random(3).randbytes(MIB))
        vmid = uuid.uuid4()
        replicator = site.replicator(vmid, "app01", [image], server.port)
        with pytest.raises(fp.NotAuthorized):
            trio.run(replicator.cycle)
        assert scrape(url).get("frrep_failures_total", reason="not_authorized") == 1

        # A bad file is refused, and the entries in use are kept (logged).
        good = site.server_config.read_text()
        site.server_config.write_text(good + "\n[[authorization]]\nstorage = 7\n")
        server.proc.send_signal(signal.SIGHUP)
        assert server.wait_for_log("reload refused, the authorization entries in use are kept")
        with pytest.raises(fp.NotAuthorized):
            trio.run(replicator.cycle)

        # The entry added, HUP: the same primary is admitted, without a restart.
        site.write_server_config(port=server.port)
        _with_metrics(site.server_config, SERVER_HOST)
        server.proc.send_signal(signal.SIGHUP)
        assert server.wait_for_log("authorization reloaded from")
        trio.run(replicator.cycle)
        assert replicator.state.ir_state == "COMPLETE"
        assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_the_notify_socket_is_optional() -> None:
    from frlink.sd_notify import sd_notify

    saved = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        assert sd_notify("READY=1") is False
    finally:
        if saved is not None:
            os.environ["NOTIFY_SOCKET"] = saved


def test_a_refused_batch_is_counted_by_its_reason(site: Site, server: ServerProcess) -> None:
    url = metrics_url(server.log.read_text)
    image = site.root / "disk0.img"
    image.write_bytes(random.Random(4).randbytes(MIB))
    replicator = site.replicator(uuid.uuid4(), "vm", [image], server.port)
    trio.run(replicator.cycle)
    assert scrape(url).get("frrep_failures_total") is None
    with image.open("r+b") as f:
        f.write(b"w" * 50_000)

    def flip(data: bytes) -> bytes:  # corrupted in flight, after its digest was taken
        return bytes([data[0] ^ 0x40]) + data[1:]

    replicator.chunk_fault = flip
    with pytest.raises(fp.DigestMismatch):
        trio.run(replicator.cycle)
    assert scrape(url).get("frrep_failures_total", reason="digest_mismatch") == 1

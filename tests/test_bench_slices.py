"""A short slice of each benchmark, so the scripts keep working between full runs.

The full runs are commands of their own (bench/README.md). These run each script the same
way on a tiny input and check the contract of its last line (one JSON object with name,
value, unit, baseline, baseline_value and ratio); ir.py and delta.py also compare the
replica with the image themselves and fail if it differs. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_no_benchmark_shadows_a_package() -> None:
    # A script's directory comes first on sys.path: bench/broker.py once made every
    # benchmark that imports frtesting (which imports the broker) import it instead.
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages >= {"broker", "node", "frproto"}
    assert sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem in packages) == []


def run_bench(script: str, *args: str, tmp: Path, timeout: float = 100.0) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("name", "value", "unit", "baseline", "baseline_value", "ratio"):
        assert key in result, key
    assert result["name"] == Path(script).stem
    assert result["value"] > 0
    assert result["baseline_value"] > 0
    assert not list(tmp.iterdir()), "the benchmark left scratch data behind"
    return result


def test_frame_slice(tmp_path: Path) -> None:
    result = run_bench(
        "frame.py", "--rounds", "2", "--buffers", "4", "--control-seconds", "0.05", tmp=tmp_path
    )
    assert result["unit"] == "GB/s"


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_ir_slice(tmp_path: Path, compression: str) -> None:
    result = run_bench(
        "ir.py",
        "--size-mib",
        "16",
        "--rounds",
        "1",
        "--compression",
        compression,
        "--tmp",
        str(tmp_path),
        tmp=tmp_path,
    )
    assert result["image_bytes"] == 16 * 1024 * 1024
    assert result["compression"] == compression
    # The random image (no zero chunk) is measured too, against the pipe of its bytes.
    assert result["random_ratio"] > 0
    assert result["random_baseline_value"] > 0
    assert result["random_pipe_write_value"] > 0  # the pipe whose receiver writes, fsyncs
    # A quarter of the image is zeros (sent as flags), half is text-like: compressed,
    # the chunk frames carry far less than the 3/4 of non-zero bytes.
    share = result["wire_bytes"] / result["image_bytes"]
    if compression == "none":
        assert 0.75 <= share < 0.76
    else:
        assert share < 0.6


@pytest.mark.skipif(
    shutil.which("rsync") is None and not os.environ.get("CI"),
    reason="rsync missing: scripts/bootstrap installs it as root (never skipped in CI)",
)
def test_delta_slice(tmp_path: Path) -> None:
    result = run_bench(
        "delta.py", "--size-mib", "16", "--rounds", "1", "--tmp", str(tmp_path), tmp=tmp_path
    )
    assert result["changed_bytes"] > 0
    assert result["scan_value"] > 0
    # The untimed warm-up cycles are reported, not hidden.
    assert result["warmup_seconds"]["tracker"] > 0
    assert result["warmup_seconds"]["scan"] > 0
    # The in-run floor and the cycle's phases, from both sides' timestamps (issue 16).
    assert result["floor_seconds"] > 0
    assert result["floor_ratio"] > 0
    assert set(result["phases"]) == {
        "capture", "connect", "send", "server_receive", "journal_durable", "ack", "undo", "apply"
    }  # fmt: skip
    assert all(v >= 0 for v in result["phases"].values())
    # The receiving threads' own CPU: some, and no more than the receipt's wall time
    # (with a little slack for the two clocks' resolutions).
    assert 0 < result["server_receive_cpu"] <= result["phases"]["server_receive"] + 0.01
    assert 0 < result["floor_receive_cpu"] <= result["floor_phases"]["send_receive"] + 0.05
    # And the sending threads'.
    assert result["primary_trio_cpu"] > 0
    assert result["floor_send_cpu"] > 0


def test_broker_slice(tmp_path: Path) -> None:
    # Both stores (etcd from the dev extra: never skipped), a small cluster.
    result = run_bench(
        "broker_latency.py",
        "--nodes", "8", "--vms", "200", "--existing", "60", "--new", "6",
        "--tmp", str(tmp_path),
        tmp=tmp_path,
    )  # fmt: skip
    assert [s["store"] for s in result["stores"]] == ["sqlite", "etcd"]
    assert result["p99_ms"] >= result["p50_ms"] > 0
    # The baseline is one placement-shaped transaction per store; on etcd, where the time
    # goes: the gateway and etcd alone, with the HTTP client, our JSON.
    assert all(s["txn_p99_ms"] >= s["txn_p50_ms"] > 0 for s in result["stores"])
    steps = result["stores"][1]["breakdown"]
    assert steps["raw_http_p50_ms"] > 0
    assert steps["httpx_p50_ms"] > 0
    assert steps["json_p50_ms"] > 0


def test_failover_slice(tmp_path: Path) -> None:
    result = run_bench(
        "failover.py", "--rounds", "1", "--no-etcd", "--tmp", str(tmp_path), tmp=tmp_path
    )
    assert result["stores"][0]["store"] == "sqlite"
    assert 0 < result["value"] < 30


@pytest.mark.skipif(
    shutil.which("rsync") is None and not os.environ.get("CI"),
    reason="rsync missing: scripts/bootstrap installs it as root (never skipped in CI)",
)
def test_resync_slice(tmp_path: Path) -> None:
    result = run_bench(
        "resync.py", "--size-mib", "16", "--rounds", "1", "--tmp", str(tmp_path), tmp=tmp_path
    )
    # 10 % of the 256 blocks changed: about that many were sent, not the whole image.
    assert 20 <= result["blocks_sent_median"] <= 30
    assert result["ratio"] > 0
    assert 0 < result["compare_seconds"] < result["compare_seconds"] + result["batch_seconds"]
    assert result["verify_gbps"] > 0
    assert result["cold_read_gbps"] > 0


def test_qemu_source_slice(tmp_path: Path) -> None:
    # QEMU and libnbd: scripts/bootstrap installs them as root; never skipped in CI.
    from frtesting.qemu import missing_qemu

    missing = missing_qemu()
    if missing is not None and not os.environ.get("CI"):
        pytest.skip(missing)
    result = run_bench(
        "qemu_source.py", "--size-mib", "16", "--rounds", "1", "--tmp", str(tmp_path),
        tmp=tmp_path,
    )  # fmt: skip
    assert result["changed_bytes"] > 0
    assert result["ir_value"] > 0
    assert result["ir_baseline_value"] > 0


def test_connections_slice(tmp_path: Path) -> None:
    result = run_bench(
        "connections.py",
        "--connections",
        "12",
        "--hold",
        "6",
        "--mid-body",
        "2",
        "--settle",
        "0.2",
        "--tmp",
        str(tmp_path),
        tmp=tmp_path,
        timeout=180,
    )
    assert result["unit"] == "KiB per idle connection"
    for target in ("server", "broker"):
        figures = result["results"][target]
        assert set(figures["per_conn_kib"]) == {"tcp", "tls", "negotiated", "mid-frame", "mid-body"}
        assert figures["start_kib"] > 0
        assert figures["end_kib"] > 0


def test_scale_slice(tmp_path: Path) -> None:
    # 6 VMs on the 3-node site, 2 primary processes, 18 s measured: the keys tools read,
    # every VM measured, and every replica equal to its image after the last write.
    result = run_bench(
        "scale.py",
        "--vms", "6", "--minutes", "0.3", "--interval", "5", "--size-mib", "8",
        "--seed-mib", "1", "--primaries", "2", "--tmp", str(tmp_path),
        tmp=tmp_path,
        timeout=240,
    )  # fmt: skip
    for key in (
        "vms", "minutes", "lag_p50_s", "lag_p99_s", "lag_max_s", "over_2x_interval",
        "rss_per_vm_mib", "mismatched_replicas",
    ):  # fmt: skip
        assert key in result, key
    assert result["vms"] == 6
    assert result["minutes"] == 0.3
    assert result["mismatched_replicas"] == 0
    assert result["caught_up"] is True
    assert result["lag_max_s"] >= result["lag_p99_s"] >= result["lag_p50_s"] > 0
    nodes = [p for p in result["processes"] if p["process"].startswith("node")]
    assert len(nodes) == 3
    assert sum(p["vms"] for p in nodes) == 6
    assert sum(p["cap"] for p in nodes) == 1

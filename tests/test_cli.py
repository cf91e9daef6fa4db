"""The frctl command line, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import frproto as fp


def frctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_runs_the_embedded_cluster() -> None:
    result = frctl("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "broker elected" in out
    assert out.count("the primary found a broker at the CAP; placed on") == 3
    assert "followed its replica" in out  # the migrated replica, and the re-homed ones
    assert "took the election and the CAP" in out
    assert "re-homed to" in out
    assert out.count("equals the primary disk, block for block") == 3
    assert out.rstrip().endswith("demo OK")


def test_version_json() -> None:
    result = frctl("version", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["protocol"] == "1.1"


def test_decode_prints_the_message() -> None:
    frame = fp.codec.encode_frame(fp.Keepalive(7)).hex()
    result = frctl("protocol", "decode", "--json", frame)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": "Keepalive", "token": 7}
    piped = frctl("protocol", "decode", "-", stdin=frame + "\n")
    assert piped.stdout.strip() == "Keepalive(token=7)"


def test_decode_reports_a_malformed_frame_on_stderr() -> None:
    truncated = fp.codec.encode_frame(fp.Keepalive(7))[:-1].hex()
    result = frctl("protocol", "decode", truncated)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "TruncatedFrame (TRUNCATED)" in result.stderr
    assert frctl("protocol", "decode", "zz").returncode == 1


def test_usage_error_exits_2() -> None:
    assert frctl("no-such-command").returncode == 2

"""``--log-format json``: a service's log is one JSON object per line (time in RFC 3339
UTC, level, logger, message), for a log pipeline; ``text`` stays the default."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from frtesting.server import child_env

from .node.site import Site


def _run_until_listening(config: Path, *extra: str) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "frctl", "server", "run", "--config", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(),
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if "ready" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    lines += rest.decode().splitlines()
    return lines


def test_a_service_logs_json_lines(tmp_path: Path) -> None:
    site = Site(tmp_path)
    lines = _run_until_listening(site.server_config, "--log-format", "json")
    records = [json.loads(line) for line in lines]  # every line is one object
    listening = next(r for r in records if "listening on" in r["message"])
    assert listening["level"] == "INFO"
    assert listening["logger"] == "frrep.recovery"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", listening["time"])
    assert any("stopping" in r["message"] for r in records)


def test_text_is_the_default(tmp_path: Path) -> None:
    site = Site(tmp_path)
    lines = _run_until_listening(site.server_config)
    assert any(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO frrep.recovery: ", x) for x in lines
    )
    assert not any(line.startswith("{") for line in lines)

"""A service stopped with Ctrl-C (SIGINT) says nothing more than a stop: exit 130, and
no Python traceback in its output, whenever the signal comes: while it serves, and while
Python still imports its modules (`frctl server run` and `frctl node run` printed a
KeyboardInterrupt traceback when interrupted in their first fraction of a second)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from frtesting.cluster import ClusterSite
from frtesting.server import child_env, start_server_process

from .node.site import Site


def _interrupted(proc: subprocess.Popen[bytes], log: Path | None = None) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("still running 20 s after SIGINT") from None
    text = log.read_text(errors="replace") if log is not None else out.decode(errors="replace")
    assert proc.returncode == 130, text
    assert "Traceback" not in text, text
    assert "KeyboardInterrupt" not in text, text
    return text


def _importing(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Wait until the child is past Python's own start-up and inside frctl's imports:
    OpenSSL's library is mapped (``ssl`` is imported by the services' modules, well
    before ``main`` runs)."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libssl" in maps.read_text():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"exited ({proc.returncode}) before it was interrupted: {out}")
        time.sleep(0.002)
    raise AssertionError("the child never imported ssl")


def test_a_recovery_server_stops_on_sigint_without_a_traceback(tmp_path: Path) -> None:
    site = Site(tmp_path)
    server = start_server_process(site.server_config, tmp_path)
    _interrupted(server.proc, server.log)


def test_a_cluster_node_stops_on_sigint_without_a_traceback(tmp_path: Path) -> None:
    site = ClusterSite(tmp_path, nodes=1)
    node = site.start(1)
    site.broker_node()  # it runs the broker too: the CAP's listener, the election
    _interrupted(node.proc, node.log)
    site.running.clear()


def test_a_service_interrupted_while_it_starts_says_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    cluster = ClusterSite(tmp_path / "cluster", nodes=1)
    for command in (
        ["server", "run", "--config", str(site.server_config)],
        ["node", "run", "--config", str(cluster.config_path(1))],
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "frctl", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
        _importing(proc)
        _interrupted(proc)

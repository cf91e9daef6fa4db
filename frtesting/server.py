"""Running a real recovery server process, for tests and benchmarks.

:func:`start_server_process` starts ``frctl server run --config FILE`` as a child process,
its output in a log file, and returns once the server says where it listens (a config
may ask for port 0, any free port).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Where this package and its siblings (frctl, ...) are importable from: the source tree
#: or site-packages alike, so a child ``python -m frctl`` finds the same code.
_PACKAGES = str(Path(__file__).resolve().parents[1])
_LISTENING = re.compile(r"listening on [0-9.]+:(\d+)")


def child_env() -> dict[str, str]:
    """The environment of a child ``python -m frctl``: this one, unbuffered, with the
    directory these packages live in first on its path."""
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": _PACKAGES + (os.pathsep + path if path else ""),
    }


@dataclass
class ServerProcess:
    """A running ``frctl server run`` process."""

    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        """True once ``text`` appears in the server's log (it logs asynchronously)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return True
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Ask it to stop (SIGINT), SIGKILL if it does not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server_process(
    config: Path, log_dir: Path, *, timeout: float = 30.0, module: str = "frctl"
) -> ServerProcess:
    """Start a recovery server from ``config`` and wait until it listens.

    ``module`` is what ``python -m`` runs with ``server run --config ...`` (tests run a
    deliberately faulty server this way).

    Raises:
        RuntimeError: the server exited or did not listen within ``timeout`` (with its log).
    """
    log = log_dir / f"server-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "server", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return ServerProcess(proc, log, int(match.group(1)))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()}")

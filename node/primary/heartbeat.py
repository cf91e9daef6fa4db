"""The primary service's heartbeat: a small file that says the service is alive.

A VM's state file is written by the service after each cycle; a service that died writes
nothing more, so the file alone cannot tell a healthy idle VM from one nobody replicates.
The running service therefore rewrites ``<state_dir>/service.json`` every
:data:`HEARTBEAT_SECONDS` with its process id, host and the time
(:func:`beat`). Status reads it (:func:`read_heartbeat`, :func:`pid_alive`) and judges
(:func:`node.primary.status.service_liveness`):

* a service stopped the ordinary way (Ctrl-C, SIGTERM, a cancelled nursery) removes the
  file: "not running";
* a killed one (SIGKILL, a crash) leaves it, but its process is gone: "not running" at
  once when status runs on the same host;
* a hung one leaves a file that grows stale: "not running" after :data:`STALE_SECONDS`.

An embedder that runs :class:`~node.primary.replicator.VMReplicator` objects in its own
process, without :func:`~node.primary.service.run_primary`, starts :func:`beat` in its
nursery for the same effect.

The file is replaced by a rename but not fsynced: after a machine crash a stale or
missing heartbeat says the same thing, "not running", which is then true.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

#: Name of the heartbeat file in a primary's state directory (not a VMID: the state
#: store's listing skips it).
HEARTBEAT_FILE: Final = "service.json"
#: How often the service rewrites its heartbeat.
HEARTBEAT_SECONDS: Final = 2.0
#: A heartbeat older than this is a service that stopped beating (hung, or its host
#: died). Generous against a busy machine: a killed service on this host is seen at once
#: by its pid, not by this bound.
STALE_SECONDS: Final = 15.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What the service last wrote of itself."""

    pid: int
    host: str
    started_at: float
    beat_at: float
    interval_s: float

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "pid": self.pid,
            "host": self.host,
            "started_at": self.started_at,
            "beat_at": self.beat_at,
            "interval_s": self.interval_s,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Heartbeat | None:
        """Parse the file's object; None when it is not one (a torn or foreign file
        says nothing about a live service)."""
        if not isinstance(doc, dict):
            return None
        try:
            pid, host = doc["pid"], doc["host"]
            numbers = [doc["started_at"], doc["beat_at"], doc["interval_s"]]
        except KeyError:
            return None
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(host, str):
            return None
        if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
            return None
        return cls(pid, host, float(numbers[0]), float(numbers[1]), float(numbers[2]))


def heartbeat_path(state_dir: Path) -> Path:
    """Where the service of ``state_dir`` writes its heartbeat."""
    return Path(state_dir) / HEARTBEAT_FILE


def this_host() -> str:
    """The name this host writes in its heartbeat."""
    return socket.gethostname()


def write_heartbeat(state_dir: Path, beat: Heartbeat) -> None:
    """Replace the heartbeat file with ``beat`` (a rename: never half a file)."""
    path = heartbeat_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(beat.to_json()) + "\n")
    os.replace(tmp, path)


def read_heartbeat(state_dir: Path) -> Heartbeat | None:
    """The heartbeat in ``state_dir``, or None when there is none (or it is unreadable)."""
    try:
        raw = heartbeat_path(state_dir).read_text()
    except OSError:
        return None
    try:
        return Heartbeat.from_json(json.loads(raw))
    except ValueError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (a killed service
    not yet reaped by its parent is dead all the same)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: os.kill said it exists
    # The state letter follows the command name in parentheses (which may hold spaces).
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def remove_heartbeat(state_dir: Path, pid: int) -> None:
    """Remove the heartbeat if process ``pid`` wrote it (a stopping service's last act;
    never another service's file)."""
    beat = read_heartbeat(state_dir)
    if beat is not None and beat.pid == pid and beat.host == this_host():
        with contextlib.suppress(FileNotFoundError):
            heartbeat_path(state_dir).unlink()


async def beat(
    state_dir: Path,
    *,
    interval: float = HEARTBEAT_SECONDS,
    clock: Callable[[], float] = time.time,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the heartbeat now and every ``interval`` seconds until cancelled; then
    remove it. ``task_status.started()`` comes after the first write, so a service that
    says it started is already seen alive."""
    pid, host, started = os.getpid(), this_host(), clock()
    try:
        write_heartbeat(state_dir, Heartbeat(pid, host, started, started, interval))
        task_status.started()
        while True:
            await trio.sleep(interval)
            write_heartbeat(state_dir, Heartbeat(pid, host, started, clock(), interval))
    finally:
        remove_heartbeat(state_dir, pid)

"""Unplanned failover, and its complete or cancel, on a running stand-alone recovery server.

A running server holds its storage (``node/storage/lock.py``), so an offline tool may not
change a replica under it. Instead, ``frctl failover unplanned`` asks the server itself,
on a local control socket, ``<first storage location>/.frrep-control.sock`` (a Unix
socket, mode 0600: only the server's user reaches it): the server takes the VM (as a
migration does: a primary that opens it meanwhile gets BUSY; a VM a session has open is
refused BUSY, and the command tries again for a while), waits until its last
acknowledged batch is applied, fails the replica over at the chosen kept point
(:meth:`node.storage.Replica.fail_over`, crash-safe as offline) and lets the VM go. From
then on its former primary is refused, as after any failover. The command then runs the
start hook with the replica's images, as offline.

The same socket completes or cancels a failover (``frctl failover complete`` /
``cancel``, ``node/failover/complete.py``): the server holds the VM as for a failover,
settles it, and runs the same crash-safe step the offline command runs; and it answers a
``ping`` (a recovery plan's dry run: the target is reachable), with its version.

One request per connection, a JSON line each way::

    -> {"action": "failover", "vmid": "...", "point": 12}        (point: null for the latest)
    <- {"ok": true, "sequence": 12, "generation": 3}
    -> {"action": "complete", "vmid": "..."}
    -> {"action": "cancel", "vmid": "...", "discard_writes": false}
    <- {"ok": true, "sequence": 14, "generation": 2, "points": [11, 12, 13, 14]}
    -> {"action": "ping"}
    <- {"ok": true, "version": "0.1.0", "protocol": "1.1"}
    <- {"ok": false, "error": "...", "busy": false}
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import trio

import frproto as fp
from node.storage import Replica, ReplicaStore
from node.storage.layout import ReplicaLayout
from node.storage.point_copy import PointCopy

log = logging.getLogger("frrep.failover")

#: The control socket's name in the server's first storage location.
SOCKET_NAME: Final = ".frrep-control.sock"
#: Largest request read (a JSON line).
MAX_REQUEST: Final = 4096
#: The actions the control socket answers.
ACTIONS: Final = ("failover", "complete", "cancel", "ping")


class ControlHost(Protocol):
    """What the control socket uses of the recovery server."""

    def hold(self, vmid: uuid.UUID) -> bool: ...

    def release(self, vmid: uuid.UUID) -> None: ...

    async def settle(self, vmid: uuid.UUID) -> None: ...

    def locations(self) -> list[Path]: ...

    async def holders(self, vmid: uuid.UUID) -> list[ReplicaStore]: ...


def socket_path(storages: list[Path]) -> Path:
    """Where the control socket of a server with these storage locations is."""
    return sorted(storages)[0] / SOCKET_NAME


async def run_held(
    server: ControlHost, vmid: uuid.UUID, work: Callable[[Replica], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``work`` (in a thread) on the replica of ``vmid`` with the VM held (a primary
    that opens it meanwhile gets BUSY) and its last acknowledged batch applied; the
    answer to send (``work``'s, or why it was not run or failed)."""
    found = await server.holders(vmid)
    if len(found) != 1:
        what = "no replica" if not found else "a replica in two storage locations"
        return {"ok": False, "busy": False, "error": f"the server holds {what} of {vmid}"}
    if not server.hold(vmid):
        return {
            "ok": False,
            "busy": True,
            "error": f"VM {vmid} is being replicated on a connection right now",
        }
    try:
        await server.settle(vmid)
        replica = found[0].open(vmid)
        return await trio.to_thread.run_sync(work, replica)
    except fp.FrprotoError as exc:
        return {"ok": False, "busy": False, "error": str(exc)}
    finally:
        server.release(vmid)


async def fail_over_held(server: ControlHost, vmid: uuid.UUID, point: int | None) -> dict[str, Any]:
    """Fail ``vmid`` over inside the running server; the answer to send."""

    def work(replica: Replica) -> dict[str, Any]:
        generation = replica.fail_over(point)
        sequence = replica.applied_sequence
        log.info(
            "unplanned failover of %s at sequence %d (generation %d), asked on the control socket",
            vmid,
            sequence,
            generation,
        )
        return {"ok": True, "sequence": sequence, "generation": generation}

    return await run_held(server, vmid, work)


def parse_request(raw: bytes) -> dict[str, Any]:
    """A request read from the socket, checked (its VMID a UUID, its point an integer
    or null, its flags booleans).

    Raises:
        ValueError: not a request this socket answers.
    """
    request = json.loads(raw)
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    action = request.get("action")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if action == "ping":
        return {"action": action}
    out: dict[str, Any] = {"action": action, "vmid": uuid.UUID(str(request["vmid"]))}
    if action == "failover":
        point = request.get("point")
        if point is not None and not isinstance(point, int):
            raise ValueError("point must be an integer or null")
        out["point"] = point
    elif action == "cancel":
        discard = request.get("discard_writes", False)
        if not isinstance(discard, bool):
            raise ValueError("discard_writes must be true or false")
        out["discard_writes"] = discard
    return out


async def answer_request(server: ControlHost, request: dict[str, Any]) -> dict[str, Any]:
    """The answer to a request :func:`parse_request` checked."""
    action = request["action"]
    if action == "ping":
        major, minor = fp.limits.PROTOCOL_VERSION
        return {"ok": True, "version": fp.__version__, "protocol": f"{major}.{minor}"}
    if action == "failover":
        return await fail_over_held(server, request["vmid"], request["point"])
    # Imported here: complete.py uses this module's client side.
    from .complete import end_held

    return await end_held(
        server, request["vmid"], action, discard_writes=request.get("discard_writes", False)
    )


async def serve_control(
    server: ControlHost, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on the control socket until cancelled. Without one (no storage location, a
    path too long for a Unix socket) the server runs on, and says so: an unplanned
    failover then needs it stopped."""
    locations = server.locations()
    if not locations:
        task_status.started(None)
        return
    path = socket_path(locations)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        path.unlink(missing_ok=True)  # a socket left by a server that was killed
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        log.warning(
            "no control socket (%s): a failover, its complete or cancel need the server stopped",
            exc,
        )
        task_status.started(None)
        return
    finally:
        os.umask(old)
    sock.listen(8)
    listener = trio.SocketListener(sock)
    task_status.started(path)

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(30):
                    raw = await stream.receive_some(MAX_REQUEST)
                    request = parse_request(raw)
            except (ValueError, KeyError, TypeError, trio.TooSlowError) as exc:
                reply: dict[str, Any] = {"ok": False, "busy": False, "error": str(exc)}
            else:
                reply = await answer_request(server, request)
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    try:
        await trio.serve_listeners(answer, [listener])
    finally:
        path.unlink(missing_ok=True)


def running_copy(storage: Path, vmid: uuid.UUID, sequence: int) -> PointCopy:
    """The failed-over replica as the start hook sees it, read from its files (the
    running server holds the replica: it is not opened here)."""
    layout = ReplicaLayout(storage, vmid)
    state = json.loads(layout.state.read_text())
    disks = tuple(layout.image(str(d["disk_id"])) for d in state["disks"])
    return PointCopy(vmid, sequence, layout.dir, layout.config, disks, 0, 0.0)


def ask(
    storages: list[Path],
    request: dict[str, Any],
    *,
    wait_s: float = 30.0,
    answer_s: float = 300.0,
) -> dict[str, Any]:
    """Send ``request`` to the running server of ``storages`` (blocking); its answer. A
    VM busy on a connection is asked again until ``wait_s`` has passed; each answer is
    waited for ``answer_s`` (a complete or a cancel of a big replica takes a while).

    Raises:
        OSError: no server answers on the control socket (none runs, or it died before
            it answered).
    """
    path = socket_path(storages)
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(f"{path} is not a control socket")
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(answer_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode())
            data = b""
            while not data.endswith(b"\n"):
                piece = sock.recv(MAX_REQUEST)
                if not piece:
                    break
                data += piece
        if not data.endswith(b"\n"):
            raise OSError(f"the server at {path} closed the connection without an answer")
        reply: dict[str, Any] = json.loads(data)
        if reply.get("ok") or not reply.get("busy") or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def ping(storages: list[Path], *, timeout: float = 5.0) -> dict[str, Any]:
    """Whether the server of ``storages`` runs and answers on its control socket: its
    answer (``ok``, ``version``, ``protocol``; ``ok`` false from a server too old to
    know ``ping``).

    Raises:
        OSError: no server answers.
    """
    return ask(storages, {"action": "ping"}, wait_s=timeout, answer_s=timeout)


def ask_running_server(
    storages: list[Path], vmid: uuid.UUID, point: int | None, *, wait_s: float = 30.0
) -> dict[str, Any]:
    """Ask the running server of ``storages`` to fail ``vmid`` over (blocking); its
    answer. A VM busy on a connection is asked again until ``wait_s`` has passed.

    Raises:
        OSError: no server answers on the control socket.
    """
    request = {"action": "failover", "vmid": str(vmid), "point": point}
    return ask(storages, request, wait_s=wait_s, answer_s=wait_s + 30)

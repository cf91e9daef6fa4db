"""A stand-alone recovery server's console: the same frame as a cluster node's
(``frconsole/app.py``), without the cluster.

Pages: the VMs (every replica this server holds, across its storage locations), one VM
(its recovery points; a test failover built and removed, audited; the ``frctl`` commands
of what the console does not do, and why), the server's settings as its configuration
file gives them (read-only), the audit log.

Where things are:

* The replicas are read from their state files (``node/storage/state.py``), without
  opening a replica store or a replica: nothing is locked or created, and a replica being
  written meanwhile is read as of its last durable state (a state file is replaced
  atomically).
* The administrator's account and the audit log are the same records as a cluster's
  (``broker/records.py``: :class:`~broker.records.ConsoleAccount`,
  :class:`~broker.records.AuditEntry`), in a :class:`~broker.store.ClusterStore` of the
  server's own: a SQLite file, ``[console] database`` (``console.db`` beside the first
  storage location by default). ``frctl server admin-password`` sets the password through
  ``broker/admin.py``, with its audit entry.
* A test failover (``node/failover/test.py``: a copy of a kept point, taken while
  replication goes on, no lock) is built in ``test-failovers/`` beside the database,
  without a start hook: the console runs no command of the hypervisor's. Its audit entry
  is written once the copy is complete (``broker/admin.py`` ``record_action``). An
  unplanned failover, and its complete or cancel, run the hypervisor's hooks, so the
  page gives their commands instead (the running server carries them out, asked on its
  control socket: ``node/failover/control.py``).

This is the one module of frconsole that uses the node's rooms (its configuration, the
replicas' state files, the test failover): the floors allow it that
(``tests/test_floors.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

import frproto
from broker import admin
from broker.cluster_view import read_audit
from broker.records import Keys
from broker.store import ClusterStore, open_store
from frlink.http import serve_asgi
from frlink.tls import web_server_context
from node.config import RecoveryServerConfig, console_database
from node.failover.test import TEST_MARKER, clean_up_test_failover, start_test_failover
from node.storage.layout import ReplicaLayout, parse_vmid_dir
from node.storage.state import ReplicaState

from .app import Context, Guard, ReplicaReport, console_app

log = logging.getLogger("frrep.console")

#: The keys of a stand-alone server's console records (the cluster's default prefix: the
#: file holds nothing else).
KEYS = Keys()
#: The directory of the test failovers the console builds, beside its database.
TEST_FAILOVERS = "test-failovers"


@dataclass(frozen=True)
class TestCopy:
    """A test failover the console built (a directory under :data:`TEST_FAILOVERS`)."""

    directory: Path
    vmid: str
    sequence: int
    disks: list[str]


def test_copies(root: Path) -> list[TestCopy]:
    """The test failovers under ``root``, from their markers (blocking)."""
    found = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    for name in names:
        marker = root / name / TEST_MARKER
        if os.path.islink(root / name) or not marker.is_file():
            continue
        try:
            doc = json.loads(marker.read_text())
            found.append(
                TestCopy(root / name, str(doc["vmid"]), int(doc["sequence"]), list(doc["disks"]))
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable test failover marker: %s", marker, exc)
    return found


@dataclass(frozen=True)
class HeldReplica:
    """A replica this server holds, as its state file says."""

    vmid: uuid.UUID
    name: str
    primary: str
    trust_group: str
    storage: Path  #: the storage location it is kept in
    report: ReplicaReport
    #: Why its state file cannot be read ("" when it can): the server refuses the VM
    #: until an operator sets the replica aside (``frctl replica quarantine``).
    damaged: str = ""

    @property
    def last_applied(self) -> float:
        """When the newest recovery point was applied here (0: none yet)."""
        return self.report.points[0][2] if self.report.points else 0.0


def report_of(state: ReplicaState) -> ReplicaReport:
    """What the console shows of a replica's state."""
    return ReplicaReport(
        ir_state=state.ir_state.name.lower().replace("_", " "),
        applied_sequence=state.applied_sequence,
        generation=state.generation,
        failed_over=state.failed_over,
        points=[
            (p.sequence, p.captured_at_ms / 1000, p.applied_at) for p in reversed(state.points)
        ],
    )


def read_replicas(storages: Sequence[Path]) -> list[HeldReplica]:
    """Every replica under ``storages``, from its state file (blocking: run it in a
    thread). A storage location that does not exist yet holds none; a state file that
    cannot be read is logged and left out."""
    found: list[HeldReplica] = []
    for storage in storages:
        try:
            names = sorted(os.listdir(storage))
        except FileNotFoundError:
            continue
        for name in names:
            vmid = parse_vmid_dir(name)
            if vmid is None or os.path.islink(storage / name):
                continue
            layout = ReplicaLayout(storage, vmid)
            try:
                state = ReplicaState.from_bytes(layout.state.read_bytes())
            except FileNotFoundError:
                continue  # being created, or a directory a delete is removing
            except (OSError, ValueError) as exc:
                # Shown, not left out: a VM that vanished from the console would look as
                # if nobody needed to act, while its primary is refused.
                log.warning("VM %s: its replica's state cannot be read: %s", vmid, exc)
                found.append(
                    HeldReplica(
                        vmid=vmid,
                        name="",
                        primary="",
                        trust_group="",
                        storage=storage,
                        report=ReplicaReport("damaged", 0, 0, False, []),
                        damaged=str(exc) or type(exc).__name__,
                    )
                )
                continue
            found.append(
                HeldReplica(
                    vmid=vmid,
                    name=state.name,
                    primary=state.primary,
                    trust_group=state.trust_group,
                    storage=storage,
                    report=report_of(state),
                )
            )
    return sorted(found, key=lambda r: (r.name, str(r.vmid)))


@dataclass(frozen=True)
class StandaloneSource:
    """What a stand-alone recovery server's console serves.

    ``config`` gives the configuration in use (it changes: SIGHUP reads the authorization
    entries again), ``config_path`` is its file (shown, and in the ``frctl`` commands the
    pages give).
    """

    store: ClusterStore
    config: Callable[[], RecoveryServerConfig]
    config_path: Path
    keys: Keys = KEYS

    @property
    def test_failovers(self) -> Path:
        """Where the console builds test failovers: beside its database."""
        return console_database(self.config(), self.config_path).parent / TEST_FAILOVERS

    @property
    def node(self) -> str:
        return self.config().name

    @property
    def served_by(self) -> str:
        return f"recovery server {self.node}"

    @property
    def store_name(self) -> str:
        return "the console's database"

    @property
    def password_hint(self) -> str:
        return (
            "run `frctl server admin-password --config "
            f"{shlex.quote(str(self.config_path))}` on this server first"
        )

    @property
    def audit_note(self) -> str:
        return (
            "Every change made through this console or frctl server admin-password, "
            "with who made it. Newest first."
        )

    @property
    def nav(self) -> Sequence[tuple[str, str]]:
        return (("/vms", "VMs"), ("/settings", "Settings"))

    def routes(self, guarded: Guard) -> list[BaseRoute]:
        return standalone_routes(self, guarded)


def _commands(source: StandaloneSource, replica: HeldReplica) -> list[dict[str, str]]:
    """What can be done with a replica, as the ``frctl`` commands to run on this host."""
    config = shlex.quote(str(source.config_path))
    vmid = str(replica.vmid)
    if replica.damaged:
        storage = shlex.quote(str(replica.storage))
        return [
            {
                "what": "Set the damaged replica aside",
                "command": f"frctl replica quarantine --config {config} {vmid} "
                f"--storage {storage} --yes",
                "why": (
                    "Its state file fails its checksum, so the server refuses the VM. The "
                    "replica is moved to the storage's .quarantine/ folder (kept for "
                    "inspection); the primary's next cycle starts a new initial replication."
                ),
            }
        ]
    if replica.report.failed_over:
        return [
            {
                "what": "Complete the failover",
                "command": f"frctl failover complete --config {config} {vmid}",
                "why": (
                    "Keeps the point the VM was failed over to and removes the others "
                    "(no going back). The running server does it itself, asked on its "
                    "control socket; it need not be stopped."
                ),
            },
            {
                "what": "Cancel the failover",
                "command": (f"frctl failover cancel --config {config} {vmid} [--stop-command CMD]"),
                "why": (
                    "Stops the VM (your hypervisor's command) and takes the replica back to "
                    "where replication left it, so its primary carries on. The running "
                    "server does it, asked on its control socket; refused once the VM wrote "
                    "to its disks or reverse replication started."
                ),
            },
        ]
    return [
        {
            "what": "Test failover with your hypervisor's hooks",
            "command": (
                f"frctl failover test --config {config} {vmid} --out DIR [--point SEQ] "
                "[--start-command CMD]"
            ),
            "why": (
                "The console's test failover (above) only builds the VM's disks; one that "
                "also starts the VM runs your hypervisor's command, which this console does "
                "not run on your behalf. Remove it with: frctl failover cleanup DIR "
                "[--stop-command CMD]."
            ),
        },
        {
            "what": "Unplanned failover",
            "command": f"frctl failover unplanned --config {config} {vmid} [--point SEQ]",
            "why": (
                "The running server does it itself, asked on its control socket (it "
                "need not be stopped); then the start hook runs your hypervisor's command "
                "on the replica's disks, in place, which this console does not run on "
                "your behalf. Afterwards: frctl failover complete, or cancel."
            ),
        },
        {
            "what": "Recovery points",
            "command": f"frctl replica points --config {config} {vmid}",
            "why": "The same list as above, at the command line (--json for scripts).",
        },
    ]


def standalone_routes(source: StandaloneSource, guarded: Guard) -> list[BaseRoute]:
    """The stand-alone server's pages."""

    async def replicas() -> list[HeldReplica]:
        storages = source.config().storages
        return await trio.to_thread.run_sync(read_replicas, storages)

    async def home(request: Request, ctx: Context) -> Response:
        return RedirectResponse("/vms", status_code=303)

    async def vms(request: Request, ctx: Context) -> Response:
        return ctx.page(request, "standalone_vms.html", vms=await replicas())

    async def held(vmid: str) -> HeldReplica | None:
        return next((r for r in await replicas() if str(r.vmid) == vmid), None)

    async def vm_page(
        request: Request, ctx: Context, message: str = "", error: str = "", status: int = 200
    ) -> Response:
        vmid = request.path_params["vmid"]
        replica = await held(vmid)
        if replica is None:
            return ctx.page(request, "error.html", 404, message=f"this server holds no VM {vmid}")
        audit = [e for e in await read_audit(source.store, source.keys) if e.target == vmid]
        copies = await trio.to_thread.run_sync(test_copies, source.test_failovers)
        return ctx.page(
            request,
            "standalone_vm.html",
            status,
            vm=replica,
            report=replica.report,
            commands=_commands(source, replica),
            copies=[c for c in copies if c.vmid == vmid],
            test_failovers=str(source.test_failovers),
            audit=audit,
            message=message,
            error=error,
            now=time.time(),
        )

    async def vm(request: Request, ctx: Context) -> Response:
        return await vm_page(request, ctx)

    async def test_failover(request: Request, ctx: Context) -> Response:
        """Build a test failover's copy of a kept point (no start hook), while
        replication goes on, under :attr:`StandaloneSource.test_failovers`."""
        vmid = request.path_params["vmid"]
        posted: dict[str, str] = request.state.form
        replica = await held(vmid)
        if replica is None:
            return ctx.page(request, "error.html", 404, message=f"this server holds no VM {vmid}")
        try:
            if posted.get("confirm") != "yes":
                raise ValueError("tick the box to confirm")
            raw = posted.get("point", "").strip()
            try:
                sequence = int(raw) if raw else None
            except ValueError:
                raise ValueError(f"recovery point {raw!r}: expected a number") from None
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            # The name is the primary's: only its safe characters make the directory's.
            label = re.sub(r"[^A-Za-z0-9_-]+", "_", replica.name)[:40].strip("_") or "vm"
            out = source.test_failovers / f"{label}-{vmid[:8]}-{stamp}"
            copy = await trio.to_thread.run_sync(
                partial(
                    start_test_failover, [replica.storage], replica.vmid, out, sequence=sequence
                )
            )
        except (ValueError, OSError, frproto.ReplicationError) as exc:
            return await vm_page(request, ctx, error=str(exc), status=400)
        await admin.record_action(
            source.store,
            source.keys,
            by=ctx.who,
            what="test failover",
            target=vmid,
            changes={"directory": [None, str(copy.directory)], "sequence": [None, copy.sequence]},
        )
        log.info("console: %s built a test failover of %s in %s", ctx.who, vmid, copy.directory)
        return await vm_page(
            request,
            ctx,
            message=f"test failover of point {copy.sequence} built in {copy.directory}",
        )

    async def test_cleanup(request: Request, ctx: Context) -> Response:
        """Remove one of the console's test failovers of this VM (no stop hook: the
        operator confirms the test VM is stopped)."""
        vmid = request.path_params["vmid"]
        posted: dict[str, str] = request.state.form
        name = posted.get("directory", "")
        try:
            if posted.get("confirm") != "yes":
                raise ValueError("tick the box to confirm that the test VM is stopped")
            copies = await trio.to_thread.run_sync(test_copies, source.test_failovers)
            mine = [c for c in copies if c.vmid == vmid and c.directory.name == name]
            if not mine:
                raise ValueError(f"no test failover {name!r} of this VM")
            await trio.to_thread.run_sync(clean_up_test_failover, mine[0].directory)
        except (ValueError, OSError) as exc:
            return await vm_page(request, ctx, error=str(exc), status=400)
        await admin.record_action(
            source.store,
            source.keys,
            by=ctx.who,
            what="test failover cleanup",
            target=vmid,
            changes={"directory": [str(mine[0].directory), None]},
        )
        return await vm_page(request, ctx, message=f"removed {mine[0].directory}")

    async def settings(request: Request, ctx: Context) -> Response:
        config = source.config()
        auth = config.authorization
        entries = [(e.primary, str(e.storage), e.trust_group) for e in auth.entries]
        any_primary = auth.any_primary
        metrics = config.metrics
        console = config.console
        facts: list[tuple[str, str, str]] = [
            ("[server]", "name", config.name),
            ("[server]", "listen", config.listen),
            ("[server]", "port", str(config.port)),
            ("[server]", "recovery_points", str(config.recovery_points)),
            ("[tls]", "cert", str(config.tls.cert)),
            ("[tls]", "ca", str(config.tls.ca)),
            (
                "[metrics]",
                "listen",
                f"{metrics.host}:{metrics.port}" if metrics else "(none: no metrics listener)",
            ),
        ]
        if console is not None:
            facts += [
                ("[console]", "listen", console.listen),
                ("[console]", "port", str(console.port)),
                ("[console]", "database", str(console.database)),
            ]
        return ctx.page(
            request,
            "standalone_settings.html",
            facts=facts,
            entries=entries,
            any_primary=(
                (str(any_primary.storage), any_primary.trust_group) if any_primary else None
            ),
            config_path=str(source.config_path),
        )

    return [
        Route("/", guarded(home)),
        Route("/vms", guarded(vms)),
        Route("/vms/{vmid}", guarded(vm)),
        Route("/vms/{vmid}/test-failover", guarded(test_failover), methods=["POST"]),
        Route("/vms/{vmid}/test-failover/cleanup", guarded(test_cleanup), methods=["POST"]),
        Route("/settings", guarded(settings)),
    ]


def open_console_store(database: Path) -> ClusterStore:
    """The SQLite store of a stand-alone server's console (its directory is made if
    missing; the file on first use)."""
    database = Path(os.path.abspath(database))
    database.parent.mkdir(parents=True, exist_ok=True)
    return open_store(f"sqlite://{database}")


async def serve_console(
    config: Callable[[], RecoveryServerConfig],
    config_path: Path,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the console of the server configured so (``config().console`` must be
    set), over HTTPS with the server's own certificate, until cancelled;
    ``task_status.started(port)`` once it listens.

    Raises:
        frlink.tls.TLSConfigError: the certificate or key cannot be used.
        OSError: the address cannot be had.
    """
    current = config()
    console = current.console
    if console is None:
        raise ValueError(f"{config_path}: no [console] table")
    context = web_server_context(current.tls.cert, current.tls.key)
    async with open_console_store(console.database) as store:
        app = console_app(StandaloneSource(store, config, config_path))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                partial(
                    serve_asgi, app, host=console.listen, port=console.port, ssl_context=context
                )
            )
            host = f"[{console.listen}]" if ":" in console.listen else console.listen
            log.info("%s: console at https://%s:%d/", current.name, host, port)
            task_status.started(port)

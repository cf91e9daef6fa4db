"""What an operator does with a VM's replication on the primary, as a library.

``frctl replication enable|pause|resume|set|disable`` and an embedding hypervisor tool
call the same functions: each checks what the operator asked, refuses what a cycle would
refuse (with the protocol layer's own words) and writes the VM's state file through
:class:`PrimaryStateStore`, whose state lock and three-way merge keep the running
service's fields and the operator's apart (``docs/primary-operations.md``).

Refusals raise :class:`Refused` (the message says why and what to do); a VM that is not
enabled here raises :class:`NotEnabled`. Nothing here prints: the CLI says it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import frproto as fp
from frlink.config import ConfigError, parse_compression
from frlink.tls import client_context

from .config import PrimaryConfig
from .disks import DiskUnavailable, image_size
from .heartbeat import pid_alive, read_heartbeat, this_host
from .locks import LockBusy, cycle_lock, holding
from .pending_log import is_overflowed
from .replicator import VMReplicator
from .state import IRStage, PrimaryStateStore, VMReplicationState
from .status import StatusReport, ir_percent, report, service_liveness

__all__ = [
    "CycleStillRuns",
    "EnableRequest",
    "NotEnabled",
    "Refused",
    "disable",
    "enable",
    "find_vm",
    "ir_percent",
    "new_disks",
    "replication_status",
    "replicator_for",
    "set_limits",
    "set_paused",
    "wait_for_cycle",
]


class Refused(Exception):
    """The operator's request was refused; the message says why."""


class NotEnabled(LookupError):
    """No VM (or no single VM) of that VMID or name is enabled for replication here."""


class CycleStillRuns(Exception):
    """A cycle of the VM still ran when the wait for it ended."""


@dataclass(frozen=True, slots=True)
class EnableRequest:
    """What ``enable`` is given: the VM, its disks as ``ID=PATH``, and where to."""

    vmid: str
    name: str
    disk_specs: Sequence[str]
    #: ``HOST:PORT`` of the recovery server or of a cluster's CAP.
    server: str
    #: The TLS name of the server or CAP; None: the HOST of ``server``.
    server_name: str | None = None
    frequency_s: float = 300.0
    block_size: int = 65536
    bandwidth_bps: float | None = None
    #: QEMU as the change source (``docs/qemu.md``): its QMP socket, each disk's block
    #: node as ``ID=NODE``, and the socket of an NBD server QEMU runs already, if any.
    qemu_qmp: str | None = None
    qemu_disks: Sequence[str] = ()
    qemu_nbd: str | None = None


def qemu_disks(
    disks: list[dict[str, Any]], request: EnableRequest, work_dir: Path
) -> dict[str, Any] | None:
    """With ``--qemu-qmp``: each disk's block node, its size as QEMU sees it (a qcow2's
    virtual size), QEMU reached and the nodes found; the state's ``qemu`` field."""
    if request.qemu_qmp is None:
        if request.qemu_disks or request.qemu_nbd:
            raise Refused("--qemu-disk and --qemu-nbd go with --qemu-qmp")
        return None
    from .qemu import QemuError, QemuSource

    nodes: dict[str, str] = {}
    for spec in request.qemu_disks:
        disk_id, _, node = spec.partition("=")
        if not disk_id or not node:
            raise Refused(f"--qemu-disk {spec!r}: use ID=NODE (a disk's QEMU block node)")
        nodes[disk_id] = node
    unknown = set(nodes) - {d["disk_id"] for d in disks}
    if unknown:
        raise Refused(f"--qemu-disk names no --disk {sorted(unknown)[0]!r}")
    for disk in disks:
        disk["qemu_node"] = nodes.get(disk["disk_id"], disk["disk_id"])
    source = QemuSource(
        request.qemu_qmp, [d["qemu_node"] for d in disks], work_dir, request.qemu_nbd
    )
    try:
        sizes = source.disk_sizes()
    except (DiskUnavailable, QemuError) as exc:
        raise Refused(f"--qemu-qmp: {exc}") from None
    for disk, size in zip(disks, sizes, strict=True):
        disk["size"] = size
    return {"qmp": request.qemu_qmp, "nbd": request.qemu_nbd}


def new_disks(specs: Sequence[str]) -> list[dict[str, Any]]:
    """``ID=PATH`` specs as state disks: every image an existing, non-empty file."""
    disks = []
    for spec in specs:
        disk_id, _, path = spec.partition("=")
        if not disk_id or not path:
            raise Refused(f"--disk {spec!r}: use ID=PATH to an existing image")
        image = Path(path).resolve()
        try:
            size = image_size(disk_id, image)
        except DiskUnavailable as exc:
            raise Refused(f"--disk {exc}; use ID=PATH to an existing image") from None
        if size == 0:
            raise Refused(f"--disk {spec!r}: the image {image} is empty")
        disks.append({"disk_id": disk_id, "path": str(image), "size": size})
    return disks


def _check_like_the_protocol(vmid: uuid.UUID, name: str, disks: list[dict[str, Any]]) -> None:
    """Refuse what every cycle would refuse, with the protocol layer's own words: the
    RelationshipCreate the first cycle sends is built (and so checked) here."""
    try:
        fp.RelationshipCreate(
            vmid, name, tuple(fp.DiskInfo(d["disk_id"], int(d["size"])) for d in disks)
        )
    except fp.FrprotoError as exc:
        cause = exc.__cause__
        raise Refused(
            cause.message if isinstance(cause, fp.FrprotoError) else exc.message
        ) from None


def _target(server: str, server_name: str | None, vmid: uuid.UUID) -> tuple[str, int, str]:
    """``HOST:PORT`` and the TLS name, checked: (host, port, server name)."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused(f"--server {server!r}: use HOST:PORT (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [2001:db8::1]:7443; the check below refuses a bracketed name
        if ":" not in host:
            raise Refused(f"--server {server!r}: brackets are for an IPv6 address only")
    name = server_name or host
    try:
        fp.QueryRecoveryServerResponse(vmid, name, int(port), fp.ExistingVM.NEW)
    except fp.FrprotoError as exc:
        raise Refused(f"--server-name {name!r}: not a server name ({exc})") from None
    return host, int(port), name


def _refuse_held(store: PrimaryStateStore, vmid: uuid.UUID, disks: list[dict[str, Any]]) -> None:
    """Refuse a VM already enabled, or a disk another enabled VM replicates."""
    if store.exists(str(vmid)):
        held = store.load(str(vmid))
        raise Refused(
            f"VM {vmid} is already enabled (replication/{held.name}, {held.ir_state}, "
            f"sequence {held.sequence}); enabling it again would start its relationship "
            f"over. Change its settings with `frctl replication set`, or disable it first"
        )
    for other in store.all():
        shared = {d["path"] for d in other.disks} & {d["path"] for d in disks}
        if shared:
            raise Refused(
                f"{sorted(shared)[0]} is already a disk of replication/{other.name} ({other.vmid})"
            )


def enable(store: PrimaryStateStore, request: EnableRequest) -> VMReplicationState:
    """Enable replication of a VM: its state is written with the IR still to do, and the
    primary service starts replicating it at its next turn.

    Raises:
        Refused: a VMID that is not a GUID, a disk that is not an image, what the
            protocol would refuse (names, sizes), a VM or disk already enabled.
    """
    try:
        vmid = uuid.UUID(request.vmid)
    except ValueError:
        raise Refused(f"--vmid {request.vmid!r} is not a GUID") from None
    disks = new_disks(request.disk_specs)
    qemu = qemu_disks(disks, request, store.vm_dir(str(vmid)) / "qemu")
    _check_like_the_protocol(vmid, request.name, disks)
    host, port, server_name = _target(request.server, request.server_name, vmid)
    _refuse_held(store, vmid, disks)
    state = VMReplicationState(
        vmid=str(vmid),
        name=request.name,
        disks=disks,
        block_size=request.block_size,
        recovery_host=host,
        recovery_port=port,
        server_name=server_name,
        frequency_s=request.frequency_s,
        bandwidth_bps=request.bandwidth_bps,
        ir_state=IRStage.NOT_STARTED,
        incarnation=uuid.uuid4().hex,
        qemu=qemu,
    )
    try:
        state.validate()
    except ValueError as exc:
        raise Refused(str(exc)) from None
    store.save(state)
    return state


def find_vm(store: PrimaryStateStore, text: str) -> VMReplicationState:
    """The state of the VM named by ``text``: its VMID, or its name when one VM has it.

    Raises:
        NotEnabled: no such VM, or a name several VMs share (the message says which).
    """
    try:
        vmid = str(uuid.UUID(text))
    except ValueError:
        named = [s for s in store.all() if s.name == text]
        if len(named) == 1:
            return named[0]
        if named:
            raise NotEnabled(
                f"{len(named)} VMs are named {text!r}; give the VMID "
                f"({', '.join(s.vmid for s in named)})"
            ) from None
        raise NotEnabled(f"no VM {text!r} is enabled for replication here") from None
    try:
        return store.load(vmid)
    except FileNotFoundError:
        raise NotEnabled(f"VM {vmid} is not enabled for replication here") from None


def wait_for_cycle(
    store: PrimaryStateStore,
    state: VMReplicationState,
    timeout: float,
    on_wait: Callable[[], None] | None = None,
) -> bool:
    """Wait until no cycle of the VM runs (its cycle lock is free), up to ``timeout``
    seconds; False when one still runs. ``on_wait`` is called once if it must wait."""
    lock = cycle_lock(store.root, state.vmid)
    if lock.try_acquire():
        lock.release()
        return True
    if on_wait is not None:
        on_wait()
    try:
        lock.acquire(timeout)
    except LockBusy:
        return False
    lock.release()
    return True


def set_paused(
    store: PrimaryStateStore, state: VMReplicationState, paused: bool
) -> tuple[VMReplicationState, str | None]:
    """Pause or resume the VM's replication: (the new state, why it had halted, if it
    had and this resumes it). A resume also ends a planned failover in doubt
    (``failover_in_doubt``): the operator decided the recovery side did not take the VM
    over. A pause does not wait for a running cycle: call :func:`wait_for_cycle` for that."""
    halted: list[str] = []

    def change(st: VMReplicationState) -> None:
        st.paused = paused
        if not paused and st.halted is not None:
            # A person looked at why it halted: the running service tries again. A replica
            # deleted in the cluster halts again (only disable + enable seeds a new one).
            halted.append(st.halted)
            st.halted = None
        if not paused:
            # A failover in doubt (node/primary/failover_doubt.py) ends here by the
            # operator's decision: they know the recovery side did not take the VM over.
            st.failover_in_doubt = None

    return store.update(state.vmid, change), (halted[0] if halted else None)


def set_limits(
    store: PrimaryStateStore,
    state: VMReplicationState,
    *,
    frequency_s: float | None = None,
    bandwidth_bps: float | None = None,
    no_bandwidth_limit: bool = False,
    compression: str | None = None,
) -> VMReplicationState:
    """Change an enabled VM's frequency, bandwidth limit or compression (the service sees
    it at its next turn; a new compression at its next connection's negotiation).

    ``compression``: ``"zstd"``, ``"lz4"``, ``"zstd,lz4"``, ``"none"``, or ``"default"``
    (the primary configuration's again).

    Raises:
        Refused: nothing to change, or a compression that is not one of those.
    """
    if (
        frequency_s is None
        and bandwidth_bps is None
        and not no_bandwidth_limit
        and compression is None
    ):
        raise Refused("give --frequency, --bandwidth, --no-bandwidth-limit or --compression")
    own: str | None = None
    if compression is not None and compression != "default":
        try:
            offered = parse_compression(compression, "--compression")
        except ConfigError as exc:
            raise Refused(str(exc).replace("[primary] compression: ", "")) from None
        # One spelling in the state file: the methods in the protocol's order, or none.
        own = ",".join(str(m.name).lower() for m in fp.CompressionSet if m in offered) or "none"

    def change(st: VMReplicationState) -> None:
        if compression is not None:
            st.compression = own
        if frequency_s is not None:
            st.frequency_s = frequency_s
        if bandwidth_bps is not None:
            st.bandwidth_bps = bandwidth_bps
        if no_bandwidth_limit:
            st.bandwidth_bps = None

    return store.update(state.vmid, change)


def disable(
    store: PrimaryStateStore,
    state: VMReplicationState,
    timeout: float,
    on_wait: Callable[[], None] | None = None,
) -> None:
    """Stop replicating the VM and forget it here (its state, pending log and maps).

    Raises:
        CycleStillRuns: a cycle still ran after ``timeout`` seconds; the VM is left
            paused, not disabled.
    """
    # Paused first, so that no new cycle starts; then the running one (if any) is waited
    # for, and the files are removed while no cycle can write them.
    store.update(state.vmid, lambda st: setattr(st, "paused", True))
    wait_for_cycle(store, state, timeout, on_wait)
    try:
        with holding(cycle_lock(store.root, state.vmid), timeout=0):
            store.delete(state.vmid)
    except LockBusy:
        raise CycleStillRuns(
            f"replication/{state.name}: a cycle still runs after {timeout:.0f} s; "
            f"it is paused now, not disabled (run disable again)"
        ) from None


def replication_status(
    state_dir: Path, *, now: float | None = None, store: PrimaryStateStore | None = None
) -> StatusReport:
    """Every enabled VM's replication as status shows it, judged now from the files
    alone (their states, the service's heartbeat, the pending logs' overflow marks): no
    network, no lock, safe while the service runs or after it died.

    ``frctl replication status`` and ``wait`` print this; an embedding tool calls it for
    the same answer (``report.vms``, ``report.health``, ``report.summary``).
    """
    store = store or PrimaryStateStore(state_dir)
    when = time.time() if now is None else now
    beat = read_heartbeat(store.root)
    # A heartbeat from this host is checked against its process: a killed service is
    # seen at once, not only once its heartbeat is stale.
    alive = pid_alive(beat.pid) if beat is not None and beat.host == this_host() else None
    states = store.all()
    return report(
        states,
        now=when,
        service=service_liveness(beat, now=when, pid_alive=alive),
        overflowed=[s.vmid for s in states if is_overflowed(store.vm_dir(s.vmid) / "pending")],
    )


def replicator_for(config: PrimaryConfig, vmid: str) -> VMReplicator:
    """A :class:`VMReplicator` for one enabled VM, configured as
    the primary service would (for verify, resync, reseed and failover commands).

    Raises:
        FileNotFoundError: the VM is not enabled here.
    """
    store = PrimaryStateStore(config.state_dir)
    state = store.load(vmid)
    tls = config.tls
    return VMReplicator(
        state,
        store,
        client_context(tls.cert, tls.key, tls.ca),
        local_address=config.local_address,
        compression=config.compression,
        hosts=config.hosts,
    )

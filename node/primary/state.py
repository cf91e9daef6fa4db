"""Persisted per-VM state of the primary server, one atomic JSON file per VM.

Layout under the store's root (the primary's ``state_dir``)::

    <root>/<vmid>/state.json     this module (VMReplicationState, JSON, one object)
    <root>/<vmid>/...            whatever else the replicator keeps per VM (digest maps,
                                 the pending log); :meth:`PrimaryStateStore.delete`
                                 removes it with the state

``<vmid>`` is always the canonical lower-case form of the VM's GUID, so nothing taken from
a user or the wire becomes a path unchecked.

Every write is atomic and durable: a temporary file in the same directory, ``fsync``,
``rename`` over the old file, ``fsync`` of the directory (:func:`write_file_atomic`, used
by the other modules of this package too). A crash leaves either the old or the new file,
never a mix.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import xxhash

from .durable import files, makedirs
from .locks import holding, state_lock

log = logging.getLogger("frrep.primary")

Buffer = bytes | bytearray | memoryview


class IRStage(StrEnum):
    """How far this primary's initial replication of a VM got
    (:attr:`VMReplicationState.ir_state`). A ``StrEnum``: the state file keeps the plain
    strings, and code that compares with them keeps working."""

    NOT_STARTED = "NOT_STARTED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETE = "COMPLETE"


class FailureKind(StrEnum):
    """Why the last cycle failed (:attr:`VMReplicationState.last_error_kind`)."""

    #: The recovery server (or broker, or node) could not be reached or stopped
    #: answering: a later cycle may get through.
    UNREACHABLE = "unreachable"
    #: A disk image vanished or cannot be read: nothing can be captured.
    DISK = "disk"
    #: The server answered with an error (refused, busy...).
    REFUSED = "refused"


class Health(StrEnum):
    """What status shows of a VM's replication (:attr:`VMReplicationState.health`)."""

    INITIAL_REPLICATION = "initial replication"
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


#: Values of :attr:`VMReplicationState.ir_state`.
IR_STATES: Final[tuple[str, ...]] = tuple(stage.value for stage in IRStage)

#: Name of a VM's state file inside its directory.
STATE_FILE: Final = "state.json"

#: Version of the JSON document; a file with another version is refused. Version 2 adds
#: ``checksum``: a flipped bit in an acknowledged sequence would otherwise read as another
#: valid state. Version 1 (no checksum) is still read; a single flipped bit cannot turn a
#: 2 into a 1 (they differ in two bits).
STATE_FORMAT: Final = 2
LEGACY_STATE_FORMAT: Final = 1

#: The fields an operator's command sets (``pause``, ``resume``, ``set``). The service
#: never writes them: its saves keep whatever the file holds
#: (:meth:`PrimaryStateStore.save_progress`), so a running cycle cannot undo a pause.
OPERATOR_FIELDS: Final[tuple[str, ...]] = ("paused", "frequency_s", "bandwidth_bps", "compression")


def operator_fields(state: VMReplicationState) -> dict[str, Any]:
    """The values of :data:`OPERATOR_FIELDS` in ``state``."""
    return {name: getattr(state, name) for name in OPERATOR_FIELDS}


class StateCorrupt(ValueError):
    """A state file exists but cannot be read as a :class:`VMReplicationState`."""


# --------------------------------------------------------------------------------------
# atomic files


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink inside ``directory`` durable."""
    files().fsync_dir(directory)


def write_file_atomic(path: Path, parts: Buffer | Sequence[Buffer]) -> int:
    """Atomically replace ``path`` with the concatenation of ``parts``.

    A unique temporary file beside ``path`` is written (without joining the parts, so a
    large buffer is not copied), fsynced, renamed over ``path``, and the directory is
    fsynced. On any error the temporary file is removed and ``path`` is unchanged.

    Returns:
        The number of bytes written.
    """
    if isinstance(parts, bytes | bytearray | memoryview):
        parts = (parts,)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    io = files()
    fd = io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    views: list[memoryview] = []
    try:
        try:
            views = [memoryview(part).cast("B") for part in parts]
            io.writev(fd, list(views), tmp)
            io.fsync(fd, tmp)
        finally:
            os.close(fd)
        io.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            io.unlink(tmp)
        raise
    io.fsync_dir(path.parent)
    return sum(v.nbytes for v in views)


def canonical_vmid(vmid: str) -> str:
    """The canonical (lower-case, hyphenated) form of a VMID; ValueError if not a GUID."""
    try:
        return str(uuid.UUID(vmid))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a VMID (GUID): {vmid!r}") from exc


# --------------------------------------------------------------------------------------
# the state


@dataclass
class VMReplicationState:
    """Everything the primary remembers about one replicated VM.

    Attributes:
        vmid: the VM's GUID, canonical string form.
        name: the VM's display name.
        disks: one ``{"disk_id": str, "path": str, "size": int}`` per disk, in order; the
            index in this list is the protocol's disk index.
        block_size: change-tracking block size in bytes.
        recovery_host / recovery_port: where the replica lives (or the broker's CAP).
        server_name: the TLS name (SNI) of the recovery server.
        frequency_s: seconds between replication cycles.
        paused: replication paused by the administrator.
        ir_state: an :class:`IRStage`.
        ir_cursor: ``[disk_index, offset]`` where a resumed IR goes on.
        ir_bytes_done / ir_bytes_total: progress of the initial replication, for status.
        sequence: the last delta batch the recovery server acknowledged (0 after IR).
        last_replicated_at: wall-clock time (``time.time()``) of the last ack, if any.
        last_cycle_started_at: wall-clock time the last cycle started, if any.
        pending_bytes: bytes in the pending log (not yet acknowledged).
        health: a :class:`Health`, as the service judged it at its last save; status
            judges afresh on read (``node/primary/status.py``), since a service that
            died writes nothing more.
        bandwidth_bps: bandwidth limit of this relationship in bytes per second (None:
            no limit of its own; the host's limit still applies).
        broker: the clustering broker's CAP name (its TLS name) once the configured
            target answered the negotiation as a clustering broker; None for a
            stand-alone server. Remembered so that a "VM not here" answer is followed
            by asking the broker again (``docs/primary-and-broker.md``).
        broker_host / broker_port: where that broker was reached (the configured
            address: the CAP moves with the broker, the address stays).
        node_name / node_address / node_port: the recovery node that holds the replica
            now, as the broker named it (FQDN, also the TLS name) and the address it
            resolved to when last reached; empty until a broker named one. Later cycles
            go straight to it.
        halted: why replication stopped and waits for a person (e.g. an administrator
            deleted the replica in the cluster); None while it runs.
    """

    vmid: str
    name: str
    disks: list[dict[str, Any]]
    block_size: int = 65536
    recovery_host: str = ""
    recovery_port: int = 0
    server_name: str = ""
    frequency_s: float = 300.0
    paused: bool = False
    ir_state: IRStage = IRStage.NOT_STARTED
    ir_cursor: list[int] = field(default_factory=lambda: [0, 0])
    ir_bytes_done: int = 0
    ir_bytes_total: int = 0
    sequence: int = 0
    last_replicated_at: float | None = None
    last_cycle_started_at: float | None = None
    pending_bytes: int = 0
    health: Health = Health.INITIAL_REPLICATION
    broker: str | None = None
    bandwidth_bps: float | None = None
    broker_host: str = ""
    broker_port: int = 0
    node_name: str = ""
    node_address: str = ""
    node_port: int = 0
    halted: str | None = None
    #: The relationship's generation as the recovery side last said (0: not known yet);
    #: sent with every RelationshipOpen, so that after a failover this primary is refused.
    generation: int = 0
    #: The next cycle resynchronizes by digests instead of capturing (reverse
    #: replication after a failover starts so: the two sides' disks are compared).
    needs_resync: bool = False
    #: A planned failover handed the VM over to its recovery side at this generation
    #: (0: never): this primary replicates it no more (``node/failover/planned.py``).
    failed_over_generation: int = 0
    #: A planned failover's request whose answer was lost (``node/primary/failover_doubt.py``):
    #: ``{"sequence", "state_digest" (hex), "generation" (the one presented),
    #: "reverse_port"}``; None: none. Written before the request is sent, cleared by its
    #: answer: while set, this primary replicates the VM no more.
    failover_in_doubt: dict[str, Any] | None = None
    #: Reverse replication: the VM failed over to this host, which replicates it back
    #: to its former primary (``node/failover/reverse.py``).
    reverse: bool = False
    #: Why the last cycle failed (a disk that vanished, a server that cannot be
    #: reached), shown by status; None after a cycle that succeeded.
    last_error: str | None = None
    #: A token written when the VM is enabled (or seeded anew): a replicator that finds
    #: another one in the file knows its state was replaced and stops.
    incarnation: str = ""
    #: Which replicator object wrote this file last (a random token of each): a service
    #: whose replicator finds another's token knows another process (a resync or a
    #: failover from the CLI) moved the VM on, and starts over from the file.
    written_by: str = ""
    #: When a cycle last ended with the replica confirmed current: everything captured
    #: was acknowledged and nothing was left pending. An idle VM whose cycles find
    #: nothing to send is in sync, not lagging: status measures the lag from the later
    #: of this and :attr:`last_replicated_at` (``node/primary/status.py``).
    last_synced_at: float | None = None
    #: What kind of failure :attr:`last_error` is (a :class:`FailureKind` value), None
    #: after a cycle that succeeded.
    last_error_kind: str | None = None
    #: When the first of the failed cycles in a row that could not reach the recovery
    #: server started; None once a cycle reached it.
    unreachable_since: float | None = None
    #: When the service means to start the next cycle (wall clock), if it runs.
    next_cycle_at: float | None = None
    #: Counters since :attr:`stats_since` (Measure-VMReplication's columns): cycles that
    #: succeeded and failed, delta batches acknowledged, their bytes and the largest.
    cycles_ok: int = 0
    cycles_failed: int = 0
    batches_sent: int = 0
    batch_bytes_sent: int = 0
    batch_bytes_max: int = 0
    stats_since: float | None = None
    #: The compression methods this VM offers (``"zstd"``, ``"lz4"``, ``"zstd,lz4"``,
    #: ``"none"``), set by ``frctl replication set --compression``; None: the primary
    #: configuration's ``compression``.
    compression: str | None = None
    #: QEMU as the change source (``docs/qemu.md``): ``{"qmp": SOCKET, "nbd": SOCKET or
    #: null}``, each disk then naming its block node as ``"qemu_node"``; None: the disks
    #: are image files (a tracker or the digest scan finds what changed).
    qemu: dict[str, Any] | None = None
    #: The QEMU change source's dirty bitmaps as the last cycle found them: ``intact``,
    #: or what was lost (and that the VM resynchronizes by digests); None without QEMU.
    qemu_bitmap: str | None = None
    #: When the last acknowledged batch was captured (wall clock): the point in time the
    #: replica holds. ``now`` minus this is the VM's lag as an RPO counts it (the
    #: acknowledgement comes a cycle's duration later, or more after a failed cycle).
    last_captured_at: float | None = None

    def validate(self) -> None:
        """Raise ValueError when a field has an impossible value."""
        if canonical_vmid(self.vmid) != self.vmid:
            raise ValueError(f"vmid {self.vmid!r} is not in canonical form")
        if self.block_size <= 0 or self.block_size % 512:
            raise ValueError(f"block_size {self.block_size} is not a positive multiple of 512")
        for disk in self.disks:
            if not isinstance(disk, dict):
                raise ValueError("a disk entry is not an object")
            if not isinstance(disk.get("disk_id"), str) or not isinstance(disk.get("path"), str):
                raise ValueError("a disk entry needs string 'disk_id' and 'path'")
            size = disk.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError("a disk entry needs a non-negative integer 'size'")
        if self.ir_state not in IR_STATES:
            raise ValueError(f"ir_state {self.ir_state!r} is not one of {IR_STATES}")
        if len(self.ir_cursor) != 2 or any(v < 0 for v in self.ir_cursor):
            raise ValueError("ir_cursor is not [disk_index, offset]")
        if self.sequence < 0 or self.pending_bytes < 0:
            raise ValueError("sequence and pending_bytes must not be negative")
        counters = (
            self.cycles_ok,
            self.cycles_failed,
            self.batches_sent,
            self.batch_bytes_sent,
            self.batch_bytes_max,
        )
        if any(c < 0 for c in counters):
            raise ValueError("a counter is negative")
        if self.last_error_kind is not None and self.last_error_kind not in set(FailureKind):
            raise ValueError(f"last_error_kind {self.last_error_kind!r} is not a known kind")
        if not math.isfinite(self.frequency_s) or self.frequency_s <= 0:
            raise ValueError("frequency_s must be a positive number of seconds")
        if self.qemu is not None:
            if not isinstance(self.qemu.get("qmp"), str) or not isinstance(
                self.qemu.get("nbd"), str | None
            ):
                raise ValueError("qemu needs a string 'qmp' and a string or null 'nbd'")
            if not all(isinstance(d.get("qemu_node"), str) for d in self.disks):
                raise ValueError("with qemu, every disk needs its block node as 'qemu_node'")
        doubt = self.failover_in_doubt
        if doubt is not None:
            if set(doubt) != {"sequence", "state_digest", "generation", "reverse_port"}:
                raise ValueError(
                    "failover_in_doubt needs sequence, state_digest, generation, reverse_port"
                )
            numbers = (doubt["sequence"], doubt["generation"], doubt["reverse_port"])
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
                raise ValueError("failover_in_doubt: sequence, generation, reverse_port are counts")
            digest = doubt["state_digest"]
            if not isinstance(digest, str) or len(digest) != 32:
                raise ValueError("failover_in_doubt: state_digest is 16 bytes in hex")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise ValueError("failover_in_doubt: state_digest is not hex") from None
        for port in (self.recovery_port, self.broker_port, self.node_port):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port} is not 0-65535")

    def to_json(self) -> dict[str, Any]:
        """The JSON document (with its ``format`` version)."""
        doc = asdict(self)
        doc["format"] = STATE_FORMAT
        doc["checksum"] = state_checksum(doc)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> VMReplicationState:
        """Parse and check a document made by :meth:`to_json`.

        Fields missing from an older file take their defaults; unknown keys are ignored.

        Raises:
            StateCorrupt: not an object, wrong format, wrong types or impossible values.
        """
        if not isinstance(doc, dict) or doc.get("format") not in (
            STATE_FORMAT,
            LEGACY_STATE_FORMAT,
        ):
            raise StateCorrupt("not a primary state document of a known format")
        if doc["format"] == STATE_FORMAT and doc.get("checksum") != state_checksum(doc):
            raise StateCorrupt("the state's checksum does not match (a damaged file)")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in doc:
                kwargs[f.name] = doc[f.name]
        try:
            state = cls(**kwargs)
            _check_types(state)
            state.validate()
            # The file holds the plain strings; in memory they are the enums.
            state.ir_state = IRStage(state.ir_state)
            state.health = Health(state.health)
        except (TypeError, ValueError) as exc:
            raise StateCorrupt(f"bad primary state: {exc}") from exc
        return state


def state_checksum(doc: dict[str, Any]) -> str:
    """XXH3-64 (hex) of the document without its ``checksum``, serialized canonically."""
    body = json.dumps(
        {k: v for k, v in doc.items() if k != "checksum"}, sort_keys=True, separators=(",", ":")
    )
    return xxhash.xxh3_64_hexdigest(body.encode())


_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "vmid": (str,),
    "name": (str,),
    "disks": (list,),
    "block_size": (int,),
    "recovery_host": (str,),
    "recovery_port": (int,),
    "server_name": (str,),
    "frequency_s": (int, float),
    "paused": (bool,),
    "ir_state": (str,),
    "ir_cursor": (list,),
    "sequence": (int,),
    "last_replicated_at": (int, float, type(None)),
    "last_cycle_started_at": (int, float, type(None)),
    "pending_bytes": (int,),
    "health": (str,),
    "broker": (str, type(None)),
    "broker_host": (str,),
    "broker_port": (int,),
    "node_name": (str,),
    "node_address": (str,),
    "node_port": (int,),
    "halted": (str, type(None)),
    "generation": (int,),
    "needs_resync": (bool,),
    "failed_over_generation": (int,),
    "failover_in_doubt": (dict, type(None)),
    "reverse": (bool,),
    "last_error": (str, type(None)),
    "incarnation": (str,),
    "written_by": (str,),
    "last_synced_at": (int, float, type(None)),
    "last_error_kind": (str, type(None)),
    "unreachable_since": (int, float, type(None)),
    "next_cycle_at": (int, float, type(None)),
    "cycles_ok": (int,),
    "cycles_failed": (int,),
    "batches_sent": (int,),
    "batch_bytes_sent": (int,),
    "batch_bytes_max": (int,),
    "stats_since": (int, float, type(None)),
    "compression": (str, type(None)),
    "qemu": (dict, type(None)),
    "qemu_bitmap": (str, type(None)),
    "last_captured_at": (int, float, type(None)),
}


def _check_types(state: VMReplicationState) -> None:
    for name, kinds in _TYPES.items():
        value = getattr(state, name)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"field {name!r} has the wrong type")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in state.ir_cursor):
        raise TypeError("ir_cursor is not two integers")


class PrimaryStateStore:
    """The per-VM states of one primary server, under ``root``.

    Synchronous and cheap (one small file per call); safe to call from Trio code directly
    or through ``trio.to_thread``. Two processes saving the same VM at once do not corrupt
    it: the last rename wins.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        makedirs(self.root)

    def vm_dir(self, vmid: str) -> Path:
        """The directory of one VM (its state file and the replicator's files)."""
        return self.root / canonical_vmid(vmid)

    def save(self, state: VMReplicationState) -> None:
        """Atomically and durably write ``state`` whole (ValueError if it does not
        validate). For a new VM; changes to an enabled one go through :meth:`update` or
        :meth:`save_progress`."""
        state.validate()
        with holding(state_lock(self.root, state.vmid)):
            self._write(state)

    def _write(self, state: VMReplicationState) -> None:
        directory = self.vm_dir(state.vmid)
        makedirs(directory)
        raw = json.dumps(state.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        write_file_atomic(directory / STATE_FILE, raw)

    def update(self, vmid: str, change: Callable[[VMReplicationState], None]) -> VMReplicationState:
        """Read one VM's state, apply ``change`` to it and write it back, all under the
        VM's state lock: a service saving its progress meanwhile cannot lose the change.

        Raises:
            FileNotFoundError: the VM is not enabled.
            StateCorrupt: its file is unreadable.
        """
        with holding(state_lock(self.root, canonical_vmid(vmid))):
            state = self.load(vmid)
            change(state)
            state.validate()
            self._write(state)
            return state

    def save_progress(
        self, state: VMReplicationState, seen: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The service's save: write ``state``, except the :data:`OPERATOR_FIELDS` that
        someone else changed in the file since the caller last saw them (``seen``, what
        this method returned last time; None: take all of them from the file). Those are
        kept and copied into ``state``, so a running cycle never undoes a pause, while a
        change the caller made itself (an embedding tool's new limit) is written.

        Nothing is written when the VM was disabled meanwhile, or enabled anew (another
        :attr:`~VMReplicationState.incarnation`): a stale replicator never brings back
        or overwrites a state that is not its own.

        Returns:
            The operator fields as written (the next call's ``seen``), or None when
            nothing was written.
        """
        state.validate()
        with holding(state_lock(self.root, state.vmid)):
            try:
                current = self.load(state.vmid)
            except FileNotFoundError:
                return None
            except StateCorrupt:
                current = None  # ours is the one good copy left: write it
            if current is not None:
                if current.incarnation != state.incarnation:
                    return None
                for name in OPERATOR_FIELDS:
                    theirs = getattr(current, name)
                    if seen is None or theirs != seen.get(name):
                        setattr(state, name, theirs)
            self._write(state)
            return operator_fields(state)

    def load(self, vmid: str) -> VMReplicationState:
        """Read one VM's state.

        Raises:
            FileNotFoundError: no such VM (never enabled, or disabled).
            StateCorrupt: the file is unreadable.
        """
        path = self.vm_dir(vmid) / STATE_FILE
        raw = path.read_bytes()
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StateCorrupt(f"{path}: not JSON: {exc}") from exc
        state = VMReplicationState.from_json(doc)
        if (
            doc.get("format") == STATE_FORMAT
            and json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n" != raw
        ):
            # A flip that leaves the meaning as it was (a float's last digit) still
            # changes the bytes, which must be exactly what was written.
            raise StateCorrupt(f"{path}: not as it was written (a damaged file)")
        if state.vmid != canonical_vmid(vmid):
            raise StateCorrupt(f"{path}: holds the state of {state.vmid}")
        return state

    def exists(self, vmid: str) -> bool:
        """Whether a state is saved for ``vmid``."""
        return (self.vm_dir(vmid) / STATE_FILE).is_file()

    def all(self) -> list[VMReplicationState]:
        """Every saved state, sorted by VMID. An unreadable one is logged and skipped."""
        states = []
        for entry in sorted(self.root.iterdir()):
            try:
                vmid = canonical_vmid(entry.name)
            except ValueError:
                continue
            if vmid != entry.name or not (entry / STATE_FILE).is_file():
                continue
            try:
                states.append(self.load(vmid))
            except (OSError, StateCorrupt) as exc:
                log.warning("skipping the state of %s: %s", vmid, exc)
        return states

    def delete(self, vmid: str, *, purge: bool = True) -> None:
        """Forget a VM: its state file first (durably, under its state lock), then, with
        ``purge``, everything else in its directory. A VM that is not there is not an
        error."""
        directory = self.vm_dir(vmid)
        with holding(state_lock(self.root, canonical_vmid(vmid))):
            try:
                files().unlink(directory / STATE_FILE, missing_ok=False)
            except FileNotFoundError:
                pass
            else:
                fsync_dir(directory)
        if purge and directory.is_dir():
            files().remove_tree(directory)
            fsync_dir(self.root)

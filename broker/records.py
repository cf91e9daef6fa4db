"""What the cluster store holds, and under which keys.

Every record is a JSON object under ``/frrep/``:

============================  =================================================================
key                           record
============================  =================================================================
``/frrep/nodes/<name>``       :class:`NodeRecord`: a recovery node (FQDN, address, port,
                              capacity, state). Written by the node itself, attached to its
                              lease: a node that stops renewing disappears and is down.
``/frrep/node-admin/<n>``     :class:`NodeAdmin`: what an administrator decided about a node
                              (draining, labels such as ``maintenance``); not leased.
``/frrep/vms/<vmid>``         :class:`VMRecord`: a replica VM as a cluster resource (owner
                              node, storage, primary identity, trust group, state, deleted).
``/frrep/settings``           :class:`Settings`: the cluster-wide settings every node watches.
``/frrep/broker``             :class:`ElectionRecord`: who runs the broker, attached to the
                              holder's lease. Its ``create_revision`` is the fencing token.
``/frrep/placement``          :class:`PlacementCursor`: where round-robin goes on.
``/frrep/console/account``    :class:`ConsoleAccount`: the web console's administrator (a
                              password hash, the secret its session cookies are signed with).
``/frrep/audit/<t>-<id>``     :class:`AuditEntry`: one administrative change (who, when, what,
                              old -> new); written in the same transaction as the change.
============================  =================================================================

Records are plain frozen dataclasses with ``to_json`` / ``from_json``; ``from_json``
refuses a malformed record with :class:`RecordError` instead of guessing.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar


@dataclass(frozen=True)
class Keys:
    """The store keys of one cluster, under ``prefix`` (several clusters, or tests, may
    share one etcd)."""

    prefix: str = "/frrep/"

    @property
    def nodes(self) -> str:
        """Prefix of the node records."""
        return self.prefix + "nodes/"

    @property
    def node_admin(self) -> str:
        """Prefix of the administrators' node records."""
        return self.prefix + "node-admin/"

    @property
    def vms(self) -> str:
        """Prefix of the VM records."""
        return self.prefix + "vms/"

    @property
    def settings(self) -> str:
        """The settings record."""
        return self.prefix + "settings"

    @property
    def election(self) -> str:
        """The broker's election record."""
        return self.prefix + "broker"

    @property
    def placement(self) -> str:
        """The round-robin cursor."""
        return self.prefix + "placement"

    @property
    def console_account(self) -> str:
        """The web console's administrator account."""
        return self.prefix + "console/account"

    @property
    def audit(self) -> str:
        """Prefix of the audit log's entries (their keys sort by time)."""
        return self.prefix + "audit/"

    def node(self, name: str) -> str:
        """The key of a node's record."""
        return self.nodes + name

    def admin(self, name: str) -> str:
        """The key of what the administrator decided about a node."""
        return self.node_admin + name

    def vm(self, vmid: uuid.UUID | str) -> str:
        """The key of a VM's record."""
        return self.vms + str(vmid)


#: The keys of a cluster with the default prefix.
KEYS: Final = Keys()


class RecordError(ValueError):
    """A record in the store is not what this version understands."""


class NodeState(enum.StrEnum):
    """A node's state as placement sees it."""

    UP = "up"
    DRAINING = "draining"  #: keeps its replicas for now; nothing new is placed on it
    DOWN = "down"  #: stopped renewing its lease


class VMState(enum.StrEnum):
    """A replica VM's state as a cluster resource."""

    PLACED = "placed"  #: an owner was chosen; replication may not have started
    MIGRATING = "migrating"  #: being copied to another node (local storage)


class FailoverState(enum.StrEnum):
    """Where a failover to a VM's replica is (``VMRecord.failover``; ``frcluster/failover.py``).

    The values are what the store holds, so records written before this enum load as they
    are. Only ``NONE`` is falsy (it is the empty string).
    """

    NONE = ""  #: never asked
    REQUESTED = "requested"  #: an administrator asked; the owner carries it out
    DONE = "done"  #: the VM runs from the replica: its former primary is refused from now on
    FAILED = "failed"  #: the owner could not (``VMRecord.failover_note`` says why)
    #: Done, and an administrator asked to complete it (keep its point, remove the others)
    COMPLETE_REQUESTED = "complete-requested"
    #: Done and completed: it can no longer be cancelled
    COMPLETED = "completed"
    #: Done, and an administrator asked to cancel it: the owner stops the VM and brings
    #: the replica back to where replication left it; the record then says ``NONE``
    #: again (or ``DONE``, with the reason in the note, if the cancel was refused)
    CANCEL_REQUESTED = "cancel-requested"
    #: A planned failover asked at the cluster (``frctl cluster failover --planned``): the
    #: owner asks the VM's primary on its next connection (FailoverAsk, protocol 1.1);
    #: the primary carries it out (then ``DONE``) or declines (then ``PLANNED_DECLINED``)
    PLANNED_REQUESTED = "planned-requested"
    #: A planned failover asked at the cluster that did not happen: its primary declined
    #: (the reason in the note) or did not answer in time (withdrawn). Nothing changed:
    #: the VM goes on replicating from its primary, and may move like any other
    PLANNED_DECLINED = "planned-declined"

    @property
    def settled(self) -> bool:
        """The owner has recorded an outcome (done, failed, or a planned ask declined)."""
        return self in (FailoverState.DONE, FailoverState.FAILED, FailoverState.PLANNED_DECLINED)

    @property
    def pins(self) -> bool:
        """The replica must stay on its node (no migration, no re-homing): the VM runs
        from it, or a failover of it is asked or was tried. Not so for a planned failover
        declined: the VM still runs at its primary and replicates as before."""
        return self not in (FailoverState.NONE, FailoverState.PLANNED_DECLINED)

    @property
    def in_force(self) -> bool:
        """The VM runs from its replica: its former primary is refused."""
        return self in (
            FailoverState.DONE,
            FailoverState.COMPLETE_REQUESTED,
            FailoverState.COMPLETED,
            FailoverState.CANCEL_REQUESTED,
        )

    @property
    def ending(self) -> bool:
        """A complete or a cancel is asked and not carried out yet."""
        return self in (FailoverState.COMPLETE_REQUESTED, FailoverState.CANCEL_REQUESTED)


class PlacementPolicy(enum.StrEnum):
    """How placement picks among the candidate nodes (``Settings.placement_policy``;
    ``broker/placement.py`` describes each)."""

    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"
    CAPACITY_AWARE = "capacity-aware"


R = TypeVar("R")


def _load(cls: type[R], raw: bytes | str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{what}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{what}: not a JSON object")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    # Unknown keys are dropped: a newer broker may add fields an older node ignores.
    return {k: v for k, v in data.items() if k in known}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _dump(record: Any) -> bytes:
    # A shallow dict, not dataclasses.asdict: records hold only JSON values (no nested
    # dataclasses), and asdict's recursive deep copy was a visible share of a placement.
    data = {name: getattr(record, name) for name in _field_names(type(record))}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _typed(value: Any, kind: type, what: str) -> Any:
    if kind is int and isinstance(value, bool):
        raise RecordError(f"{what}: expected int, got {value!r}")
    if not isinstance(value, kind):
        raise RecordError(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class NodeRecord:
    """A recovery node as it announces itself (leased: gone when the node is)."""

    name: str  #: the node's FQDN: what its certificate names, what primaries connect to
    address: str
    port: int
    #: Bytes of replica storage this node offers, and how much of it is in use.
    capacity_bytes: int = 0
    used_bytes: int = 0
    #: Where this node keeps replicas; ``shared`` means every node sees the same path.
    storage: str = ""
    shared_storage: bool = False
    #: The ``mod_revision`` of the settings record this node runs with (0: the defaults,
    #: never set): an operator sees which nodes applied a change.
    settings_revision: int = 0

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeRecord:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "node record")
        try:
            return cls(
                name=_typed(d["name"], str, "node name"),
                address=_typed(d["address"], str, "node address"),
                port=_typed(d["port"], int, "node port"),
                capacity_bytes=_typed(d.get("capacity_bytes", 0), int, "capacity_bytes"),
                used_bytes=_typed(d.get("used_bytes", 0), int, "used_bytes"),
                storage=_typed(d.get("storage", ""), str, "storage"),
                shared_storage=_typed(d.get("shared_storage", False), bool, "shared_storage"),
                settings_revision=_typed(d.get("settings_revision", 0), int, "settings_revision"),
            )
        except KeyError as exc:
            raise RecordError(f"node record: missing {exc}") from None

    @property
    def free_bytes(self) -> int:
        """Room left (never negative)."""
        return max(0, self.capacity_bytes - self.used_bytes)


@dataclass(frozen=True)
class NodeAdmin:
    """An administrator's decisions about a node (not leased: they outlive restarts)."""

    draining: bool = False
    #: Free-form labels placement rules may read (e.g. ``{"maintenance": "true"}``).
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeAdmin:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "node admin record")
        labels = _typed(d.get("labels", {}), dict, "labels")
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise RecordError(f"labels: {k!r}={v!r} is not text")
        return cls(draining=_typed(d.get("draining", False), bool, "draining"), labels=labels)


@dataclass(frozen=True)
class NodeView:
    """What placement sees of a node: its announcement, the admin's decisions, the
    state that follows from both."""

    record: NodeRecord
    admin: NodeAdmin
    state: NodeState

    @property
    def name(self) -> str:
        """The node's FQDN."""
        return self.record.name


@dataclass(frozen=True)
class VMRecord:
    """A replica VM as a cluster resource."""

    vmid: str
    owner: str  #: the node that holds the replica now (its FQDN)
    storage: str  #: where on the owner the replica lives
    primary: str = ""  #: the primary server's identity that created it
    trust_group: str = ""
    name: str = ""
    size_bytes: int = 0  #: the VM's disks, summed (placement by bytes, capacity)
    state: VMState = VMState.PLACED
    #: An administrator deleted the replica: a primary asking again gets "deleted" and must
    #: stop, not seed a new replica.
    deleted: bool = False
    #: The replica lives on storage every node sees: moving it is an ownership change.
    shared: bool = False
    #: The node the replica is being moved to (set by the broker; the owner does the move).
    migrate_to: str = ""
    #: A failover to this replica (``frcluster/failover.py``), see :class:`FailoverState`.
    failover: FailoverState = FailoverState.NONE
    #: Requested: the recovery point to fail over to (-1: the latest). Done: the point
    #: the VM runs from.
    failover_point: int = -1
    #: Done: the relationship's new generation.
    failover_generation: int = 0
    #: Why a failover failed, or what the start hook said.
    failover_note: str = ""
    #: Reverse replication after a failover (``frctl cluster reverse``): the owner
    #: replicates the VM to this recovery server, ``HOST:PORT`` ("" for none), named
    #: :attr:`reverse_name` in TLS (``frcluster/reverse.py``).
    reverse_to: str = ""
    reverse_name: str = ""

    def __post_init__(self) -> None:
        # Code that still says failover="done" gets the member, so ``is`` compares hold
        # (FailoverState(member) is the member itself).
        object.__setattr__(self, "failover", FailoverState(self.failover))

    def to_json(self) -> bytes:
        """The record as stored (without the reverse fields while they are empty: a record
        written before they existed reads and writes back byte for byte)."""
        if self.reverse_to or self.reverse_name:
            return _dump(self)
        data = {
            name: getattr(self, name)
            for name in _field_names(type(self))
            if name not in ("reverse_to", "reverse_name")
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> VMRecord:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "VM record")
        try:
            vmid = _typed(d["vmid"], str, "vmid")
            uuid.UUID(vmid)
            state = VMState(d.get("state", VMState.PLACED.value))
            return cls(
                vmid=vmid,
                owner=_typed(d["owner"], str, "owner"),
                storage=_typed(d["storage"], str, "storage"),
                primary=_typed(d.get("primary", ""), str, "primary"),
                trust_group=_typed(d.get("trust_group", ""), str, "trust_group"),
                name=_typed(d.get("name", ""), str, "name"),
                size_bytes=_typed(d.get("size_bytes", 0), int, "size_bytes"),
                state=state,
                deleted=_typed(d.get("deleted", False), bool, "deleted"),
                shared=_typed(d.get("shared", False), bool, "shared"),
                migrate_to=_typed(d.get("migrate_to", ""), str, "migrate_to"),
                failover=_failover_state(d.get("failover", "")),
                failover_point=_typed(d.get("failover_point", -1), int, "failover_point"),
                failover_generation=_typed(
                    d.get("failover_generation", 0), int, "failover_generation"
                ),
                failover_note=_typed(d.get("failover_note", ""), str, "failover_note"),
                reverse_to=_typed(d.get("reverse_to", ""), str, "reverse_to"),
                reverse_name=_typed(d.get("reverse_name", ""), str, "reverse_name"),
            )
        except KeyError as exc:
            raise RecordError(f"VM record: missing {exc}") from None
        except ValueError as exc:
            raise RecordError(f"VM record: {exc}") from None


#: The values of ``VMRecord.failover`` as stored.
FAILOVER_STATES: Final = tuple(s.value for s in FailoverState)


def _failover_state(value: object) -> FailoverState:
    if value not in FAILOVER_STATES:
        raise ValueError(f"failover must be one of {FAILOVER_STATES}, not {value!r}")
    return FailoverState(value)


#: A placement rule's name in the settings: ``module:attribute`` or an entry-point name.
_RULE_NAME: Final = re.compile(r"[A-Za-z0-9_.]+:[A-Za-z0-9_.]+|[A-Za-z0-9_-]+")

#: Placement policies by setting name (see broker/placement.py).
PLACEMENT_POLICIES: Final = tuple(p.value for p in PlacementPolicy)


def _placement_policy(value: str) -> PlacementPolicy:
    if value not in PLACEMENT_POLICIES:
        choices = ", ".join(PLACEMENT_POLICIES)
        raise RecordError(f"placement_policy {value!r}: one of {choices}")
    return PlacementPolicy(value)


@dataclass(frozen=True)
class Settings:
    """Cluster-wide settings: set once (at the broker or any node), applied by every node."""

    recovery_enabled: bool = True
    auth_type: str = "certificate"  #: mutual TLS with certificates (the only one built)
    port: int = 0  #: the nodes' and the broker's replication port (0: each node's own)
    #: Authorization entries, as in a recovery server's config ``[[authorization]]`` tables.
    authorization: list[dict[str, Any]] = field(default_factory=list)
    default_storage: str = ""
    placement_policy: PlacementPolicy = PlacementPolicy.ROUND_ROBIN
    #: Extra placement rules, run before each placement: import paths ``module:attribute``
    #: or names of the ``frrep.placement_rules`` entry points (e.g. ``"maintenance"``).
    placement_rules: list[str] = field(default_factory=list)
    recovery_points: int = 24

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Settings:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "settings")
        base = cls()
        s = cls(
            recovery_enabled=_typed(
                d.get("recovery_enabled", base.recovery_enabled), bool, "recovery_enabled"
            ),
            auth_type=_typed(d.get("auth_type", base.auth_type), str, "auth_type"),
            port=_typed(d.get("port", base.port), int, "port"),
            authorization=_typed(d.get("authorization", []), list, "authorization"),
            default_storage=_typed(d.get("default_storage", ""), str, "default_storage"),
            placement_policy=_placement_policy(
                _typed(d.get("placement_policy", base.placement_policy), str, "placement_policy")
            ),
            placement_rules=_typed(d.get("placement_rules", []), list, "placement_rules"),
            recovery_points=_typed(
                d.get("recovery_points", base.recovery_points), int, "recovery_points"
            ),
        )
        s.check()
        return s

    def check(self) -> None:
        """Refuse values no node could apply (:class:`RecordError`)."""
        _placement_policy(self.placement_policy)  # a Settings built in code may hold text
        if self.auth_type != "certificate":
            raise RecordError(f"auth_type {self.auth_type!r}: only 'certificate' is supported")
        if not 0 <= self.port <= 65535:
            raise RecordError(f"port {self.port} out of range")
        if self.recovery_points < 1:
            raise RecordError("recovery_points must be at least 1")
        for entry in self.authorization:
            if not isinstance(entry, dict):
                raise RecordError(f"authorization entry {entry!r} is not a table")
        for rule in self.placement_rules:
            if not isinstance(rule, str) or not _RULE_NAME.fullmatch(rule):
                raise RecordError(
                    f"placement rule {rule!r}: expected 'module:attribute' or an entry-point name"
                )

    def changes(self, other: Settings) -> dict[str, tuple[Any, Any]]:
        """``{name: (self's value, other's value)}`` for every setting that differs, as
        JSON values (what the store holds: plain text for the enums)."""
        a, b = json.loads(self.to_json()), json.loads(other.to_json())
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


@dataclass(frozen=True)
class ElectionRecord:
    """Who runs the broker now, and where its CAP is."""

    holder: str  #: the node's FQDN
    cap_name: str  #: the CAP's DNS name (its certificate's SAN)
    cap_address: str
    cap_port: int
    elected_at: float = 0.0  #: wall-clock time of the election (for operators)

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ElectionRecord:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "election record")
        try:
            return cls(
                holder=_typed(d["holder"], str, "holder"),
                cap_name=_typed(d["cap_name"], str, "cap_name"),
                cap_address=_typed(d["cap_address"], str, "cap_address"),
                cap_port=_typed(d["cap_port"], int, "cap_port"),
                elected_at=float(_typed(d.get("elected_at", 0.0), (int, float), "elected_at")),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise RecordError(f"election record: missing {exc}") from None


@dataclass(frozen=True)
class PlacementCursor:
    """Round-robin's position: the node chosen last (by name, so that nodes joining or
    leaving do not shift it)."""

    last_node: str = ""
    placed: int = 0  #: placements made so far (for operators)

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> PlacementCursor:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "placement cursor")
        return cls(
            last_node=_typed(d.get("last_node", ""), str, "last_node"),
            placed=_typed(d.get("placed", 0), int, "placed"),
        )


@dataclass(frozen=True)
class ConsoleAccount:
    """The web console's administrator account (``frctl cluster admin-password``)."""

    user: str
    #: ``frlink.passwords.hash_password``'s text; never the password.
    password_hash: str
    #: Signs the console's session cookies and CSRF tokens (hex). A new one comes with
    #: every password change, so that a change logs every session out.
    session_secret: str
    changed_at: float = 0.0

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ConsoleAccount:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "console account")
        try:
            return cls(
                user=_typed(d["user"], str, "user"),
                password_hash=_typed(d["password_hash"], str, "password_hash"),
                session_secret=_typed(d["session_secret"], str, "session_secret"),
                changed_at=float(_typed(d.get("changed_at", 0.0), (int, float), "changed_at")),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise RecordError(f"console account: missing {exc}") from None


@dataclass(frozen=True)
class AuditEntry:
    """One administrative change, as the audit log keeps it."""

    at: float  #: wall-clock time of the change (seconds since the epoch)
    who: str  #: the person or tool, e.g. ``admin (console at n1.example.com)``
    what: str  #: the action: ``settings``, ``migrate``, ``failover``, ``delete``, ...
    target: str  #: what it changed: a VMID, a node's name, ``settings``
    #: ``{field: [old, new]}`` of the record changed (secrets are never shown).
    changes: dict[str, list[Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The record as stored."""
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> AuditEntry:
        """Parse a stored record; :class:`RecordError` if malformed."""
        d = _load(cls, raw, "audit entry")
        try:
            return cls(
                at=float(_typed(d["at"], (int, float), "at")),  # type: ignore[arg-type]
                who=_typed(d["who"], str, "who"),
                what=_typed(d["what"], str, "what"),
                target=_typed(d["target"], str, "target"),
                changes=_typed(d.get("changes", {}), dict, "changes"),
            )
        except KeyError as exc:
            raise RecordError(f"audit entry: missing {exc}") from None

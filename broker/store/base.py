"""The cluster store interface: types, errors and the abstract `ClusterStore`.

The semantics are etcd v3's (a subset), so that the embedded SQLite backend and the etcd
backend are interchangeable and pass one contract test suite:

- One global, strictly increasing **revision**. Every write (put, delete of an existing key,
  a txn that writes, the expiry or revocation of a lease that holds keys) bumps it by exactly
  one; all writes of one txn share that revision. Reads never bump it.
- Each key carries ``create_revision`` (revision of the put that created it),
  ``mod_revision`` (revision of its last put) and ``version`` (number of puts since it was
  created; 1 after the first put). A deleted key starts again from scratch.
- ``create_revision == 0`` / ``version == 0`` in a `Compare` mean "the key is absent"; a
  ``value`` compare on an absent key is always false (etcd's rule).
- A **lease** has a TTL; when it expires or is revoked every key attached to it is deleted in
  one revision, and watchers see DELETE events.
- A **watch** delivers every change under a prefix with revision >= its start revision, in
  revision order, history first and then live; history older than the compaction point is gone
  and asking for it raises `Compacted`.

Keys are text (UTF-8); they are ordered by their UTF-8 bytes, like etcd. How keys are laid out
(``vm/<vmid>``, ``node/<name>`` ...) is the broker's business, not the store's.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = [
    "ClusterStore",
    "Compacted",
    "Compare",
    "CompareOp",
    "CompareTarget",
    "Delete",
    "EventKind",
    "Get",
    "KeyValue",
    "LeaseExpired",
    "Op",
    "Put",
    "StoreError",
    "StoreUnavailable",
    "TxnResult",
    "WatchEvent",
    "prefix_range_end",
]


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of every error the cluster store raises on purpose."""


class LeaseExpired(StoreError):
    """The lease does not exist (any more): it expired, was revoked or never existed."""

    def __init__(self, lease_id: int, message: str | None = None) -> None:
        super().__init__(message or f"lease {lease_id} has expired or does not exist")
        self.lease_id = lease_id


class Compacted(StoreError):
    """The requested revision is older than the store's compaction point.

    ``compact_revision`` is the oldest revision that can still be watched; the caller should
    read the current state again (`ClusterStore.range`) and watch from the revision it got.
    """

    def __init__(self, revision: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {revision} has been compacted; the oldest available revision is "
            f"{compact_revision}: read the current state again and watch from its revision"
        )
        self.revision = revision
        self.compact_revision = compact_revision


class StoreUnavailable(StoreError):
    """The backend cannot be reached or did not answer in time.

    For a write this may mean "outcome unknown": the message says so. Fenced writes (a txn
    comparing the election record) make a blind retry safe.
    """


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key with its value and revision metadata (etcd's ``mvccpb.KeyValue``)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0
    """The lease the key is attached to, 0 for none."""


class EventKind(enum.Enum):
    """What a `WatchEvent` reports."""

    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watch.

    For a PUT, ``kv`` is the key as written. For a DELETE, ``kv`` carries the key and
    ``mod_revision`` = the deletion revision; value, create_revision, version and lease are
    empty/0 (as etcd reports them).
    """

    kind: EventKind
    kv: KeyValue
    revision: int


class CompareTarget(enum.Enum):
    """Which attribute of a key a `Compare` looks at."""

    MOD = "MOD"
    CREATE = "CREATE"
    VERSION = "VERSION"
    VALUE = "VALUE"


class CompareOp(enum.Enum):
    """The comparison of a `Compare`."""

    EQUAL = "=="
    NOT_EQUAL = "!="
    LESS = "<"
    GREATER = ">"


OpLike = CompareOp | str


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a `ClusterStore.txn`: ``<target of key> <op> <operand>``.

    Build them with the class methods, e.g. ``Compare.mod_revision("vm/1", "==", 42)`` or
    ``Compare.create_revision("leader", "==", 0)`` ("leader is absent").
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.target is CompareTarget.VALUE:
            if not isinstance(self.operand, bytes):
                raise TypeError("a VALUE compare needs a bytes operand")
        elif not isinstance(self.operand, int) or isinstance(self.operand, bool):
            raise TypeError(f"a {self.target.value} compare needs an int operand")

    @classmethod
    def mod_revision(cls, key: str, op: OpLike, revision: int) -> Compare:
        """Compare the key's ``mod_revision`` (0 when absent)."""
        return cls(key, CompareTarget.MOD, CompareOp(op), revision)

    @classmethod
    def create_revision(cls, key: str, op: OpLike, revision: int) -> Compare:
        """Compare the key's ``create_revision`` (0 when absent)."""
        return cls(key, CompareTarget.CREATE, CompareOp(op), revision)

    @classmethod
    def version(cls, key: str, op: OpLike, version: int) -> Compare:
        """Compare the key's ``version`` (0 when absent)."""
        return cls(key, CompareTarget.VERSION, CompareOp(op), version)

    @classmethod
    def value(cls, key: str, op: OpLike, value: bytes) -> Compare:
        """Compare the key's value (bytewise); always false when the key is absent."""
        return cls(key, CompareTarget.VALUE, CompareOp(op), value)

    def evaluate(self, kv: KeyValue | None) -> bool:
        """Evaluate against the key's current state (``None`` = absent), by etcd's rules."""
        if kv is None:
            if self.target is CompareTarget.VALUE:
                return False  # etcd: a value compare on a missing key always fails
            actual: int | bytes = 0
        elif self.target is CompareTarget.MOD:
            actual = kv.mod_revision
        elif self.target is CompareTarget.CREATE:
            actual = kv.create_revision
        elif self.target is CompareTarget.VERSION:
            actual = kv.version
        else:
            actual = kv.value
        return _compare(actual, self.op, self.operand)


def _compare(actual: int | bytes, op: CompareOp, operand: int | bytes) -> bool:
    # Both sides have the same type (checked when the Compare was built).
    if isinstance(actual, bytes) and isinstance(operand, bytes):  # noqa: SIM114 - for mypy
        order = (actual > operand) - (actual < operand)
    elif isinstance(actual, int) and isinstance(operand, int):
        order = (actual > operand) - (actual < operand)
    else:
        raise TypeError("mismatched compare operand")
    if op is CompareOp.EQUAL:
        return order == 0
    if op is CompareOp.NOT_EQUAL:
        return order != 0
    if op is CompareOp.LESS:
        return order < 0
    return order > 0


@dataclass(frozen=True, slots=True)
class Put:
    """Txn operation: put ``value`` at ``key``, attached to ``lease`` (0 = none)."""

    key: str
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        _check_key(self.key)
        if not isinstance(self.value, bytes):
            raise TypeError("values are bytes")


@dataclass(frozen=True, slots=True)
class Delete:
    """Txn operation: delete ``key`` (nothing happens if it is absent)."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclass(frozen=True, slots=True)
class Get:
    """Txn operation: read ``key``; its result lands in `TxnResult.responses`."""

    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of a `ClusterStore.txn`.

    ``revision`` is the txn's revision if the branch taken wrote something, else the store
    revision at the time of the txn. ``responses`` has one entry per `Get` of the branch taken,
    in order: the key as seen at that point of the txn (earlier puts of the same txn included),
    or ``None`` if absent.
    """

    succeeded: bool
    revision: int
    responses: list[KeyValue | None]


# --------------------------------------------------------------------------- helpers


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError("keys are non-empty strings")


def check_branch(ops: Sequence[Op]) -> None:
    """Reject a txn branch that writes one key twice (etcd refuses it too)."""
    seen: set[str] = set()
    for op in ops:
        if isinstance(op, Put | Delete):
            if op.key in seen:
                raise ValueError(f"key {op.key!r} is written twice in one txn branch")
            seen.add(op.key)


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range holding every key that starts with ``prefix``.

    etcd's rule: strip trailing 0xff bytes and increment the last byte; ``b""`` means "no
    upper bound" (the prefix is empty or all 0xff).
    """
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b""
    end[-1] += 1
    return bytes(end)


# --------------------------------------------------------------------------- interface


class ClusterStore(ABC):
    """A key-value store with revisions, compare-and-swap txns, watches and leases.

    Async, for Trio. Use it as an async context manager (or call `aclose`). Every method may
    raise `StoreUnavailable` when the backend cannot be reached.
    """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key's current state, or ``None`` if it is absent."""

    @abstractmethod
    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key starting with ``prefix`` (``""`` = all), sorted by key, and the store
        revision this read saw (watch from ``revision + 1`` to follow on without a gap)."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``value`` at ``key``; returns the new revision.

        ``lease`` attaches the key to a lease (0 detaches it); raises `LeaseExpired` if that
        lease does not exist.
        """

    @abstractmethod
    async def delete(self, key: str) -> int:
        """Delete ``key``; returns the new revision, or the current one if it was absent."""

    @abstractmethod
    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """Atomically: if every compare holds run ``success``, else ``failure``.

        This is the compare-and-swap the broker fences its writes with (compare the election
        record's ``create_revision`` with its token). A branch may not write a key twice
        (`ValueError`); a `Put` with an unknown lease raises `LeaseExpired` and writes nothing.
        """

    @abstractmethod
    def watch(
        self, prefix: str, *, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        """Watch every key starting with ``prefix``.

        An async context manager yielding an async iterator of `WatchEvent`: every change with
        revision >= ``start_revision``, in order, history first and then live changes, until
        the context exits. ``start_revision=0`` means "changes after the current revision".
        The watch is established when the context has been entered. A ``start_revision`` older
        than the compaction point raises `Compacted` when entering; if history is compacted
        under a watcher that falls too far behind, the iterator raises `Compacted`.
        """

    @abstractmethod
    async def grant_lease(self, ttl_s: float) -> int:
        """Create a lease that expires ``ttl_s`` seconds from now unless kept alive; returns
        its id. A backend may round the TTL up (etcd: whole seconds, and a minimum); the
        `keepalive` result says what was granted."""

    @abstractmethod
    async def keepalive(self, lease_id: int) -> float:
        """Renew a lease for its full TTL; returns that TTL in seconds.

        Raises `LeaseExpired` if the lease is gone (its keys are gone too: step down).
        Call it every TTL/3 or so.
        """

    @abstractmethod
    async def revoke(self, lease_id: int) -> None:
        """End a lease now, deleting its keys. Revoking an unknown lease does nothing."""

    @abstractmethod
    async def revision(self) -> int:
        """The current store revision."""

    @abstractmethod
    async def compact(self, revision: int) -> None:
        """Drop change history older than ``revision`` (watches from before it then raise
        `Compacted`). Compacting to an already compacted revision does nothing; a revision
        beyond the current one is a `ValueError`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections. The store must not be used afterwards."""

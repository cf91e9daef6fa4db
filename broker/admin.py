"""The cluster's administration as a library: what ``frctl cluster`` does, for any tool.

An administrator changes the cluster by writing records in the cluster store; the broker
and the nodes watch the store and carry the change out. Each call here is one such write:

====================================  ==================================================
call                                  record written (and who acts on it)
====================================  ==================================================
:func:`request_migration`             ``VMRecord.migrate_to`` (the VM's owner moves it)
:func:`request_failover`              ``VMRecord.failover`` = requested (the owner fails
                                      over; :func:`await_failover` waits for its outcome)
:func:`request_planned_failover`      ``VMRecord.failover`` = planned-requested (the owner
                                      asks the VM's primary on its next connection;
                                      :func:`withdraw_planned_failover` gives up)
:func:`delete_vm`                     ``VMRecord.deleted`` (its primary is told and stops)
:func:`set_draining`                  ``NodeAdmin.draining`` (the broker moves the node's
                                      replicas away and places nothing on it)
:func:`set_labels`                    ``NodeAdmin.labels`` (placement rules read them)
:func:`update_settings`               ``Settings`` (every node applies them)
:func:`set_console_password`          ``ConsoleAccount`` (the web console's login)
====================================  ==================================================

**Every write is a compare-and-swap.** Read the record, decide on what was read, write it
only if its ``mod_revision`` is still the one read; when another writer (another
administrator, the broker, the VM's owner) got in between, read again and decide again
(:func:`_swap`, up to :data:`ATTEMPTS` times). A read-modify-put would let two
administrators who label one node at the same moment lose one of the labels.

**Refusals are typed.** What cannot be asked raises an :class:`AdminError` subclass whose
message says why, fit to show a person as it is (``frctl`` prints ``frctl: <message>``).
Errors of the store itself (:class:`~broker.store.StoreError`) and malformed records in it
(:class:`~broker.records.RecordError`) pass through unchanged.

**Changes may be audited.** Given ``by`` (who asks: ``admin (console at n1)``), a call
writes an :class:`~broker.records.AuditEntry` (who, when, what, old -> new) in the same
transaction as the change: the log holds every change made so, and nothing that was not
made. :func:`~broker.cluster_view.read_audit` reads it.

Writes are not fenced by the election (``broker/election.py``): administrators are not the
broker, and the compare on the record's revision is what keeps their writes and the
broker's from overwriting each other.
"""

from __future__ import annotations

import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

import trio

from broker.authorization import authorization_from_settings
from broker.placement import PlacementError, load_rules
from broker.records import (
    AuditEntry,
    ConsoleAccount,
    FailoverState,
    Keys,
    NodeAdmin,
    RecordError,
    Settings,
    VMRecord,
)
from broker.store import ClusterStore, Compare, Put
from frlink.passwords import hash_password

__all__ = [
    "ATTEMPTS",
    "LATEST_POINT",
    "AdminError",
    "BadVMID",
    "Contended",
    "InvalidSetting",
    "NoFailoverOutcome",
    "NoSuchVM",
    "NodeNotUp",
    "Refused",
    "Updated",
    "await_failover",
    "await_failover_ending",
    "delete_vm",
    "find_vm",
    "parse_assignments",
    "request_failover",
    "request_failover_ending",
    "request_migration",
    "set_console_password",
    "set_draining",
    "set_labels",
    "update_settings",
]

#: Compare-and-swap attempts before :class:`Contended`. Each lost attempt means another
#: write to the same record landed between our read and our write.
ATTEMPTS: Final = 10

#: ``point`` of :func:`request_failover`: the latest recovery point the owner keeps.
LATEST_POINT: Final = -1


# --------------------------------------------------------------------------- errors


class AdminError(Exception):
    """An administrative request was refused; ``str(exc)`` says why, for a person."""


class BadVMID(AdminError, ValueError):
    """The VMID is not a UUID."""


class NoSuchVM(AdminError):
    """The cluster holds no record of the VM."""


class NodeNotUp(AdminError):
    """The node named as a target is not up (it has no live node record)."""


class Refused(AdminError):
    """The VM's state forbids the request: failed over, deleted, already moving, already
    failing over, already on the target node."""


class InvalidSetting(AdminError, ValueError):
    """A setting is unknown, or its value is one no node could apply."""


class Contended(AdminError):
    """The record kept changing under :data:`ATTEMPTS` compare-and-swaps; nothing was
    written by this call. Trying again later is safe."""


class NoFailoverOutcome(AdminError):
    """:func:`await_failover` saw no outcome in time. The request stays in the record:
    the owner carries it out when it can."""


# --------------------------------------------------------------------------- the swap


class _Record(Protocol):
    def to_json(self) -> bytes: ...


R = TypeVar("R", bound=_Record)


@dataclass(frozen=True)
class Updated(Generic[R]):
    """What a successful write replaced, what it wrote, and at which store revision."""

    old: R | None  #: the record as read (``None``: there was none)
    new: R  #: the record as written
    revision: int  #: the store revision of the write


def _diff(old: _Record | None, new: _Record) -> dict[str, list[Any]]:
    """``{field: [old, new]}`` of two records' stored forms (``None`` for an old absent)."""
    a = {} if old is None else json.loads(old.to_json())
    b = json.loads(new.to_json())
    return {k: [a.get(k), b[k]] for k in b if a.get(k) != b[k]}


@dataclass(frozen=True)
class _Audit:
    """What the audit entry of a change says besides the change itself."""

    keys: Keys
    who: str
    what: str
    target: str
    describe: Callable[[Any, Any], dict[str, list[Any]]] = _diff

    def put(self, old: _Record | None, new: _Record) -> Put:
        now = time.time()
        entry = AuditEntry(now, self.who, self.what, self.target, self.describe(old, new))
        return _audit_put(self.keys, entry)


def _audit_put(keys: Keys, entry: AuditEntry) -> Put:
    # Keys sort by time; the random tail keeps two changes in one nanosecond apart.
    key = f"{keys.audit}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    return Put(key, entry.to_json())


async def record_action(
    store: ClusterStore,
    keys: Keys,
    *,
    by: str,
    what: str,
    target: str,
    changes: Mapping[str, list[Any]],
) -> None:
    """Write the audit entry of an action done outside the store (a stand-alone
    server's test failover, built on its disk): after the action, on its own, since
    there is no record to change in the same transaction."""
    entry = AuditEntry(time.time(), by, what, target, {k: list(v) for k, v in changes.items()})
    await store.txn([], [_audit_put(keys, entry)], [])


def _audit(keys: Keys, by: str, what: str, target: str) -> _Audit | None:
    return _Audit(keys, by, what, target) if by else None


async def _swap(
    store: ClusterStore,
    key: str,
    parse: Callable[[bytes], R],
    change: Callable[[R | None], R],
    *,
    contended: str,
    audit: _Audit | None = None,
) -> Updated[R]:
    """Compare-and-swap ``key``: ``change(record as read)``, written only if the record
    is still the one read; read and decide again otherwise (the one retry loop of this
    module). ``change`` raises an :class:`AdminError` to refuse; it may run several times.
    """
    for attempt in range(ATTEMPTS):
        kv = await store.get(key)
        old = None if kv is None else parse(kv.value)
        new = change(old)
        # mod_revision 0 is etcd's "absent": a record created meanwhile fails it too.
        seen = 0 if kv is None else kv.mod_revision
        writes = [Put(key, new.to_json())]
        if audit is not None:
            writes.append(audit.put(old, new))
        result = await store.txn([Compare.mod_revision(key, "==", seen)], writes, [])
        if result.succeeded:
            return Updated(old, new, result.revision)
        if attempt + 1 < ATTEMPTS:
            # Lost a race: back off a little, with jitter, so that writers racing each
            # other do not meet again at once (at most 0.2 s a wait, under a second in all).
            await trio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))
    raise Contended(contended)


def _vmid(vmid: str | uuid.UUID) -> str:
    """``vmid`` as the record's key names it; a typo is refused before anything is read."""
    if isinstance(vmid, uuid.UUID):
        return str(vmid)
    try:
        uuid.UUID(vmid)
    except ValueError as exc:
        raise BadVMID(str(exc)) from None
    return vmid


async def find_vm(store: ClusterStore, keys: Keys, text: str) -> str:
    """The VMID of the cluster's VM named by ``text``: its VMID, or its name when one VM
    of the cluster has it (as ``frctl`` accepts a VM everywhere).

    Raises:
        NoSuchVM: no VM of that VMID or name, or a name several VMs share (the message
            lists their VMIDs).
    """
    from broker.cluster_view import read_cluster

    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    view = await read_cluster(store, keys)
    named = sorted(v.vmid for v in view.vms.values() if v.name == text)
    if len(named) == 1:
        return named[0]
    if named:
        listed = ", ".join(named)
        raise NoSuchVM(
            f"{len(named)} VMs of the cluster are named {text!r}; give the VMID ({listed})"
        )
    raise NoSuchVM(f"the cluster has no VM {text!r} (neither a VMID nor a VM's name)")


async def _update_vm(
    store: ClusterStore,
    keys: Keys,
    vmid: str,
    change: Callable[[VMRecord], VMRecord],
    audit: _Audit | None = None,
) -> Updated[VMRecord]:
    def existing(vm: VMRecord | None) -> VMRecord:
        if vm is None:
            raise NoSuchVM(f"the cluster has no VM {vmid}")
        return change(vm)

    return await _swap(
        store,
        keys.vm(vmid),
        VMRecord.from_json,
        existing,
        contended="the VM's record kept changing; try again",
        audit=audit,
    )


# --------------------------------------------------------------------------- VMs


async def request_migration(
    store: ClusterStore, keys: Keys, vmid: str | uuid.UUID, node: str, *, by: str = ""
) -> Updated[VMRecord]:
    """Ask that VM ``vmid``'s replica move to ``node`` (``VMRecord.migrate_to``).

    The VM's owner carries the move out (``frcluster/migration.py``): an ownership change
    on shared storage, a copy otherwise. This returns once the request is recorded.

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NodeNotUp: ``node`` has no live node record.
        NoSuchVM: the cluster has no such VM.
        Refused: the VM is on ``node`` already, was deleted (no owner would carry the
            move out), or was failed over (it runs from its replica where it is, and
            does not move).
        Contended: the record kept changing.
    """
    vmid = _vmid(vmid)
    if await store.get(keys.node(node)) is None:
        raise NodeNotUp(f"node {node} is not up")

    def ask(vm: VMRecord) -> VMRecord:
        if vm.owner == node:
            raise Refused(f"VM {vmid} is already on {node}")
        if vm.deleted:
            raise Refused(f"VM {vmid} was deleted: it does not move")
        if vm.failover.pins:
            # It runs (or is about to run) from its replica where it is.
            raise Refused(f"VM {vmid} was failed over ({vm.failover}): it does not move")
        return replace(vm, migrate_to=node)

    return await _update_vm(store, keys, vmid, ask, _audit(keys, by, "migrate", vmid))


async def request_failover(
    store: ClusterStore,
    keys: Keys,
    vmid: str | uuid.UUID,
    *,
    point: int = LATEST_POINT,
    by: str = "",
) -> Updated[VMRecord]:
    """Ask VM ``vmid``'s owner to fail it over to its replica, at recovery point
    ``point`` (:data:`LATEST_POINT`: the latest it keeps).

    The owner carries it out (``frcluster/failover.py``) and records the outcome in the
    same record; :func:`await_failover` waits for it. A failover that failed may be asked
    again. It overrides a pending planned failover (:func:`request_planned_failover`):
    the primary is asked no more.

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoSuchVM: the cluster has no such VM.
        Refused: the VM was deleted, a failover is already requested or done, or the VM
            is moving (fail over once it has moved).
        Contended: the record kept changing.
    """
    vmid = _vmid(vmid)

    def ask(vm: VMRecord) -> VMRecord:
        if vm.deleted:
            raise Refused(f"VM {vmid} was deleted")
        if vm.failover is FailoverState.REQUESTED or vm.failover.in_force:
            raise Refused(f"VM {vmid}: a failover is already {vm.failover}")
        if vm.migrate_to:
            raise Refused(f"VM {vmid} is moving to {vm.migrate_to}; fail over after")
        return replace(vm, failover=FailoverState.REQUESTED, failover_point=point, failover_note="")

    return await _update_vm(store, keys, vmid, ask, _audit(keys, by, "failover", vmid))


async def request_planned_failover(
    store: ClusterStore, keys: Keys, vmid: str | uuid.UUID, *, by: str = ""
) -> Updated[VMRecord]:
    """Ask for a planned failover of VM ``vmid`` at the cluster: its owner asks the VM's
    primary, on the primary's next connection, to stop the VM and hand it over
    (FailoverAsk, protocol 1.1; ``frcluster/planned_ask.py``): the broker never connects
    to a primary. The primary carries it out (the record says ``DONE`` with the new
    generation) or declines (``PLANNED_DECLINED``, with its reason: the VM replicates
    on as before); a 1.0 primary is never asked.
    :func:`await_failover` waits for the outcome; :func:`withdraw_planned_failover`
    gives up. An unplanned :func:`request_failover` overrides a pending ask.

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoSuchVM: the cluster has no such VM.
        Refused: the VM was deleted, is failed over already, another failover is
            pending, or the VM is moving.
        Contended: the record kept changing.
    """
    vmid = _vmid(vmid)

    def ask(vm: VMRecord) -> VMRecord:
        if vm.deleted:
            raise Refused(f"VM {vmid} was deleted")
        if vm.failover.in_force:
            raise Refused(f"VM {vmid} is failed over already ({vm.failover})")
        if vm.failover in (FailoverState.REQUESTED, FailoverState.PLANNED_REQUESTED):
            raise Refused(f"VM {vmid}: a failover is pending ({vm.failover})")
        if vm.migrate_to:
            raise Refused(f"VM {vmid} is moving to {vm.migrate_to}; fail over after")
        return replace(
            vm, failover=FailoverState.PLANNED_REQUESTED, failover_point=-1, failover_note=""
        )

    return await _update_vm(store, keys, vmid, ask, _audit(keys, by, "failover-planned", vmid))


async def withdraw_planned_failover(
    store: ClusterStore, keys: Keys, vmid: str | uuid.UUID, *, note: str, by: str = ""
) -> Updated[VMRecord]:
    """Give up a pending planned failover of VM ``vmid`` (not answered in time): the
    record says ``PLANNED_DECLINED`` with ``note``, and the owner asks the primary no more. A record
    whose ask was answered meanwhile (done, declined) or overridden is left as it is.

    Raises:
        BadVMID, NoSuchVM, Contended: as for :func:`request_planned_failover`.
    """
    vmid = _vmid(vmid)

    def withdraw(vm: VMRecord) -> VMRecord:
        if vm.failover is not FailoverState.PLANNED_REQUESTED:
            return vm
        return replace(vm, failover=FailoverState.PLANNED_DECLINED, failover_note=note)

    return await _update_vm(
        store, keys, vmid, withdraw, _audit(keys, by, "failover-planned-withdraw", vmid)
    )


async def request_reverse(
    store: ClusterStore,
    keys: Keys,
    vmid: str | uuid.UUID,
    *,
    to: str,
    name: str,
    by: str = "",
) -> Updated[VMRecord]:
    """Ask the node that VM ``vmid`` failed over to to replicate it back, to the recovery
    server at ``to`` (``HOST:PORT``) named ``name`` in TLS: the former primary's, or any
    recovery server holding the VM's replica at the failed-over generation
    (``frctl failover adopt``). The owner starts it (``frcluster/reverse.py``), sending
    only what differs first.

    Raises:
        Refused: the VM was deleted, or it was not failed over (nothing to reverse).
    """
    vmid = _vmid(vmid)

    def ask(vm: VMRecord) -> VMRecord:
        if vm.deleted:
            raise Refused(f"VM {vmid} was deleted")
        if vm.failover is not FailoverState.DONE:
            raise Refused(f"VM {vmid} was not failed over: nothing to reverse (fail over first)")
        return replace(vm, reverse_to=to, reverse_name=name)

    return await _update_vm(store, keys, vmid, ask, _audit(keys, by, "reverse", vmid))


async def await_failover(
    store: ClusterStore,
    keys: Keys,
    vmid: str | uuid.UUID,
    *,
    timeout: float,
    poll: float = 0.1,
) -> VMRecord:
    """Wait for the outcome of VM ``vmid``'s failover; returns its record once the owner
    recorded one: ``failover`` is :attr:`~FailoverState.DONE` (``failover_point`` and
    ``failover_generation`` say where it runs from) or :attr:`~FailoverState.FAILED`
    (``failover_note`` says why).

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoFailoverOutcome: none within ``timeout`` seconds (or the record went away).
    """
    return await _await_vm(store, keys, _vmid(vmid), lambda vm: vm.failover.settled, timeout, poll)


async def _await_vm(
    store: ClusterStore,
    keys: Keys,
    vmid: str,
    done: Callable[[VMRecord], bool],
    timeout: float,
    poll: float,
) -> VMRecord:
    """VM ``vmid``'s record once ``done`` says so (:class:`NoFailoverOutcome` if not
    within ``timeout`` seconds, or if the record went away)."""
    with trio.move_on_after(timeout):
        while True:
            kv = await store.get(keys.vm(vmid))
            if kv is None:
                break
            vm = VMRecord.from_json(kv.value)
            if done(vm):
                return vm
            # Polled rather than watched: one read a tenth of a second, on either backend,
            # and nothing to re-establish when the store hiccups.
            await trio.sleep(poll)
    raise NoFailoverOutcome(
        f"no outcome within {timeout:g} s (is the owner up?); the request stays: its node "
        "carries it out when it can"
    )


async def delete_vm(
    store: ClusterStore, keys: Keys, vmid: str | uuid.UUID, *, by: str = ""
) -> Updated[VMRecord]:
    """Delete VM ``vmid``'s replica (``VMRecord.deleted``): its primary, asking the broker
    again, is told so and stops; it is never placed again.

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoSuchVM: the cluster has no such VM.
        Contended: the record kept changing.
    """
    vmid = _vmid(vmid)
    return await _update_vm(
        store, keys, vmid, lambda vm: replace(vm, deleted=True), _audit(keys, by, "delete", vmid)
    )


# --------------------------------------------------------------------------- nodes


async def _update_admin(
    store: ClusterStore,
    keys: Keys,
    node: str,
    change: Callable[[NodeAdmin], NodeAdmin],
    audit: _Audit | None = None,
) -> Updated[NodeAdmin]:
    # A node nobody decided anything about has no record: the defaults apply.
    return await _swap(
        store,
        keys.admin(node),
        NodeAdmin.from_json,
        lambda admin: change(admin or NodeAdmin()),
        contended=f"{node}'s record kept changing; try again",
        audit=audit,
    )


async def set_draining(
    store: ClusterStore, keys: Keys, node: str, draining: bool = True, *, by: str = ""
) -> Updated[NodeAdmin]:
    """Drain ``node`` (or, ``draining=False``, stop draining it).

    A draining node takes no new replica; the broker gives each of its replicas a target
    node and the owner moves it (``broker/tracking.py``). The decision outlives the
    node's restarts; the node need not be up. Its labels are kept as they are.

    Raises:
        Contended: the node's record kept changing.
    """
    return await _update_admin(
        store,
        keys,
        node,
        lambda a: replace(a, draining=draining),
        _audit(keys, by, "drain" if draining else "undrain", node),
    )


async def set_labels(
    store: ClusterStore, keys: Keys, node: str, labels: Mapping[str, str | None], *, by: str = ""
) -> Updated[NodeAdmin]:
    """Set ``node``'s labels ``{name: value}``; a value of ``None`` removes that label.
    Labels not named are kept, and so is the draining decision.

    Placement rules read the labels (``broker/rules/``, e.g. ``maintenance``).

    Raises:
        Contended: the node's record kept changing.
    """

    def change(admin: NodeAdmin) -> NodeAdmin:
        new = dict(admin.labels)
        for name, value in labels.items():
            if value is None:
                new.pop(name, None)
            else:
                new[name] = value
        return replace(admin, labels=new)

    return await _update_admin(store, keys, node, change, _audit(keys, by, "label", node))


# --------------------------------------------------------------------------- settings


def _setting_names() -> tuple[str, ...]:
    return tuple(Settings.__dataclass_fields__)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """``["NAME=VALUE", ...]`` as ``{name: value}``: each VALUE is JSON, or else a bare
    word taken as a string (``placement_policy=random``). A later NAME wins.

    Raises:
        InvalidSetting: an item is not ``NAME=VALUE`` or NAME is no setting.
    """
    updates: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in _setting_names():
            known = ", ".join(_setting_names())
            raise InvalidSetting(f"{item!r}: expected NAME=VALUE, NAME one of {known}")
        updates[name] = _parse_value(raw)
    return updates


def _apply(current: Settings, updates: Mapping[str, Any]) -> Settings:
    """``current`` with ``updates``, refused if no node could apply the result."""
    unknown = [name for name in updates if name not in _setting_names()]
    if unknown:
        known = ", ".join(_setting_names())
        raise InvalidSetting(f"{unknown[0]!r}: not a setting; one of {known}")
    try:
        # Through the stored form, so that the values are checked as a node reads them.
        new = Settings.from_json(json.dumps({**asdict(current), **updates}))
        # What a node would refuse to apply is refused here, before anything is written.
        authorization_from_settings(new.authorization, Path("/"), new.default_storage)
        load_rules(new.placement_rules)
    except (RecordError, PlacementError, TypeError) as exc:
        raise InvalidSetting(str(exc)) from exc
    return new


async def update_settings(
    store: ClusterStore, keys: Keys, updates: Mapping[str, Any], *, by: str = ""
) -> Updated[Settings]:
    """Change the cluster's settings: ``{name: value}`` (JSON values, as
    :func:`parse_assignments` makes them) over the current ones; every node applies them.

    The result is checked as a node would check it (its authorization entries, its
    placement rules loadable here) before anything is written. ``Updated.old`` is the
    settings as they were (``None`` when never set: the defaults applied);
    ``(old or Settings()).changes(new)`` says what changed.

    Raises:
        InvalidSetting: an unknown setting, or a value no node could apply.
        Contended: the settings kept changing.
    """
    return await _swap(
        store,
        keys.settings,
        Settings.from_json,
        # Never set: every node runs with the defaults, and so the change starts from them.
        lambda current: _apply(current or Settings(), updates),
        contended="the settings kept changing; try again",
        # Never set: the nodes ran with the defaults, and so the change is from them.
        audit=_Audit(keys, by, "settings", "settings", lambda o, n: _diff(o or Settings(), n))
        if by
        else None,
    )


# --------------------------------------------------------------------------- the console


def _password_change(old: ConsoleAccount | None, new: ConsoleAccount) -> dict[str, list[Any]]:
    # Never the hash nor the secret: only that the password changed, and for whom.
    changes: dict[str, list[Any]] = {"password": ["(none)" if old is None else "***", "***"]}
    if old is None or old.user != new.user:
        changes["user"] = [None if old is None else old.user, new.user]
    return changes


async def set_console_password(
    store: ClusterStore, keys: Keys, user: str, password: str, *, by: str = ""
) -> Updated[ConsoleAccount]:
    """Set the web console's administrator: ``user`` logs in with ``password`` (stored
    as a scrypt hash). Every session of the console is logged out (a new session secret).

    Raises:
        InvalidSetting: an empty user name, or a password shorter than 8 characters.
        Contended: the account kept changing.
    """
    if not user.strip() or any(c.isspace() for c in user):
        raise InvalidSetting("the user name must be one word")
    if len(password) < 8:
        raise InvalidSetting("the password must have at least 8 characters")
    account = ConsoleAccount(
        user=user,
        password_hash=hash_password(password),
        session_secret=secrets.token_hex(32),
        changed_at=time.time(),
    )
    audit = _Audit(keys, by, "password", "console", _password_change) if by else None
    return await _swap(
        store,
        keys.console_account,
        ConsoleAccount.from_json,
        lambda _old: account,
        contended="the console's account kept changing; try again",
        audit=audit,
    )


async def request_failover_ending(
    store: ClusterStore, keys: Keys, vmid: str | uuid.UUID, *, cancel: bool, by: str = ""
) -> Updated[VMRecord]:
    """Ask VM ``vmid``'s owner to complete its failover (keep the point it runs from,
    remove the others) or, with ``cancel``, to cancel it (stop the VM and bring the
    replica back to where replication left it; its primary then carries on). The owner
    carries it out (``frcluster/failover_endings.py``); :func:`await_failover_ending`
    waits for the outcome. Asking again what is already asked is no error.

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoSuchVM: the cluster has no such VM.
        Refused: the VM is not failed over, its failover was completed (a cancel), or
            the other ending is asked.
        Contended: the record kept changing.
    """
    vmid = _vmid(vmid)
    want = FailoverState.CANCEL_REQUESTED if cancel else FailoverState.COMPLETE_REQUESTED

    def ask(vm: VMRecord) -> VMRecord:
        if vm.failover is want:
            return vm
        if vm.failover is FailoverState.COMPLETED:
            if cancel:
                raise Refused(f"VM {vmid}: its failover was completed; it cannot be cancelled")
            return vm
        if vm.failover is not FailoverState.DONE:
            raise Refused(f"VM {vmid}: no failover to end (failover: {vm.failover or 'none'})")
        return replace(vm, failover=want, failover_note="")

    action = "failover-cancel" if cancel else "failover-complete"
    return await _update_vm(store, keys, vmid, ask, _audit(keys, by, action, vmid))


async def await_failover_ending(
    store: ClusterStore,
    keys: Keys,
    vmid: str | uuid.UUID,
    *,
    timeout: float,
    poll: float = 0.1,
) -> VMRecord:
    """Wait until the owner carried out the complete or cancel asked of VM ``vmid``;
    returns its record: ``failover`` is ``COMPLETED``, ``NONE`` (cancelled), or
    ``DONE`` again with the reason in ``failover_note`` (the cancel was refused).

    Raises:
        BadVMID: ``vmid`` is not a UUID.
        NoFailoverOutcome: none within ``timeout`` seconds (or the record went away).
    """
    return await _await_vm(
        store, keys, _vmid(vmid), lambda vm: not vm.failover.ending, timeout, poll
    )

"""The stand-alone recovery server: mutual TLS, authorization, and the replica stores.

One Trio task per connection. A connection is refused before the protocol starts if the
TLS handshake fails (no certificate, wrong CA, expired...). A client that speaks frproto
without TLS gets the protocol's NOT_AUTHORIZED Error in plain text, then the connection
closes: it is told why instead of seeing a TLS alert it cannot read. After the handshake
the peer's certificate names are matched against the authorization entries; a primary
that matches none gets a NegotiateResponse with status NOT_AUTHORIZED.

An authorized connection is served by a :class:`~node.recovery_session.Session`
(``recovery_session.py``: relationships, IR, delta batches, digests, delete). The server
keeps what outlives a connection: the replica store of each storage location (claimed and
recovered on first use), which VM each session holds (:meth:`RecoveryServer.hold`), and a
cluster node's hooks (ownership, the CAP's route, ``on_deleted``).

A VMID names one VM on the whole server, whatever storage location its replica is in
(REP-33): :meth:`RecoveryServer.locate` looks it up in every location served before a
session creates or opens anything, so that a primary of another trust group, given
storage of its own, is refused NOT_AUTHORIZED instead of getting a second replica. A
VMID found in two locations (storage moved by hand, a restored backup) is not served at
all until an operator removes one copy (REP-34, ``frctl replica remove-duplicate``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry

import frproto as fp
from frlink import network
from frlink.accept import Accepted, accept
from frlink.authz import Grant
from frlink.connections import Admission, Gate
from frlink.tls import server_context
from node.storage import ReplicaStore, StorageFaults
from node.storage.fileio import FileIO
from node.storage.lock import StorageBusy, claim

from .config import ConfigError, RecoveryServerConfig, load_recovery_server_config
from .metrics import ServerMetrics, failure_reason
from .recovery_session import (
    DeletedHook,
    FailedOverHook,
    PlannedAsks,
    RenamedHook,
    Session,
)

log = logging.getLogger("frrep.recovery")

#: ``await check(vmid, grant)``: raises a ReplicationError when this node must not serve
#: the VM to that peer; may return another grant to use for this VM (a cluster node copying
#: a replica in gets the grant of the VM's own primary: its trust group and storage).
OwnershipCheck = Callable[[uuid.UUID, Grant], Awaitable[Grant | None]]
#: Certificate names to a grant (raises NotAuthorized).
Authorizer = Callable[[Sequence[str]], Grant]


class CapRoute(Protocol):
    """A cluster node's listener also answering for the CAP's name (told apart by SNI),
    so that the broker and the node can share one address and port (a CAP moved by DNS)."""

    def answers(self, requested_name: str | None) -> tuple[fp.ServerPolicy, Authorizer] | None:
        """The broker's policy and authorization for a connection asking for
        ``requested_name``, or None when it is not the CAP's name."""
        ...

    async def serve(self, accepted: Accepted[Any]) -> None:
        """Serve a negotiated connection that asked for the CAP."""
        ...


class RecoveryServer:
    """A stand-alone recovery server.

    Args:
        config: listen address, name, TLS files, authorization, recovery points.
        ssl_context: overrides the context built from ``config.tls`` (tests).
        recovery_type: what negotiation answers (a cluster node answers CLUSTER_NODE).
        faults: storage fault injection (tests: a full disk, a failing write).
        ownership: a cluster node's check that it owns a VM (raises VMNotHere,
            VMDeleted...), awaited before a relationship is created or carried on.
        authorize: replaces ``config.authorization.authorize`` (a cluster node also
            admits its peer nodes).
        cap: a cluster node's route for connections that ask for the CAP's name.
        claim_storage: hold each storage location's lock (``node/storage/lock.py``) while
            serving it; False for storage that cluster nodes share.
        on_deleted: awaited after a RelationshipDelete removed a replica, before the Ack
            (a cluster node has the cluster forget the VM); may refuse the delete.
        on_renamed: awaited after a resent RelationshipCreate gave a replica another VM
            name (a cluster node records it in the VM's record); best effort.
        on_failed_over: awaited after a FailoverRequest failed a VM over here, before
            FailoverDone (reverse replication starts; ``node/failover/reverse_service.py``).
        registry: where its metrics are registered (the process's registry; a private
            one when None).
        file_io: makes the storage engine's file layer of a storage location (the
            simulation's records every call, so that a power cut can drop what was not
            synced: ``frtesting.powerloss``); the real system calls when None.
    """

    def __init__(
        self,
        config: RecoveryServerConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        recovery_type: fp.RecoveryType = fp.RecoveryType.STANDALONE,
        faults: StorageFaults | None = None,
        ownership: OwnershipCheck | None = None,
        authorize: Authorizer | None = None,
        cap: CapRoute | None = None,
        claim_storage: bool = True,
        on_deleted: DeletedHook | None = None,
        on_renamed: RenamedHook | None = None,
        on_failed_over: FailedOverHook | None = None,
        registry: CollectorRegistry | None = None,
        file_io: Callable[[Path], FileIO] | None = None,
    ) -> None:
        self.config = config
        self._file_io = file_io
        self.metrics = ServerMetrics(registry or CollectorRegistry())
        #: True while the listener accepts connections (``/readyz``).
        self.listening = False
        self.on_deleted = on_deleted
        self.on_renamed = on_renamed
        self.on_failed_over = on_failed_over
        #: A cluster node's planned failovers asked at the cluster (FailoverAsk); set by
        #: the node agent after construction (``frcluster/planned_ask.py``).
        self.planned_asks: PlannedAsks | None = None
        self._cap = cap
        self._claim_storage = claim_storage
        self._claims: list[int] = []  # lock descriptors, kept while the server runs
        self._ownership = ownership
        self._authorize = authorize
        self._faults = faults
        self._ssl = ssl_context or server_context(config.tls.cert, config.tls.key, config.tls.ca)
        self.recovery_type = recovery_type
        self._policy = fp.ServerPolicy(recovery_type, config.name)
        self._stores: dict[Path, ReplicaStore] = {}
        # Opening a store awaits its recovery in a thread: without this lock a second
        # connection's first use of the same location claimed it again meanwhile, found
        # the claim held (by us) and was closed as if another server held the storage.
        self._opening = trio.Lock()
        self._busy: set[uuid.UUID] = set()
        #: Held from the look-up of a VMID across every location to the creation of its
        #: replica: two sessions creating the same VM in two locations would both find
        #: it nowhere (REP-33).
        self.creating = trio.Lock()
        #: Counts connections against the bounds of ``config.connections`` (TIM-12).
        self.gate = Gate(config.connections)

    def hold(self, vmid: uuid.UUID) -> bool:
        """Take a VM for a maintenance task (a migration): False if a session has it. While
        held, a primary's RelationshipOpen/Create for it gets BUSY."""
        if vmid in self._busy:
            return False
        self._busy.add(vmid)
        return True

    def release(self, vmid: uuid.UUID) -> None:
        """Give back a VM taken with :meth:`hold`."""
        self._busy.discard(vmid)

    async def settle(self, vmid: uuid.UUID) -> None:
        """Wait until the VM's last acknowledged batch is applied. A session lets its VM go
        at the end of the connection while that apply may still run (the pipelined
        commit, ``docs/storage.md``): a maintenance task that took the VM with
        :meth:`hold` calls this before it reads the replica's files itself or hands them
        to another node. A failed apply is left to recovery (logged by the session)."""
        for store in list(self._stores.values()):
            replica = store.opened(vmid)
            if replica is not None:
                with contextlib.suppress(fp.ReplicationError):
                    await trio.to_thread.run_sync(replica.apply_committed)

    def forget(self, vmid: uuid.UUID) -> None:
        """Drop any open handle on the VM's replica, in every store (the next use reads
        it from disk again, or finds it gone)."""
        for store in self._stores.values():
            store.forget(vmid)

    def keep_points(self, count: int) -> None:
        """Keep ``count`` recovery points per replica in every store opened so far (a
        changed setting; stores opened later take it from :attr:`config`)."""
        for store in self._stores.values():
            store.set_keep_points(count)

    async def check_owner(self, vmid: uuid.UUID, grant: Grant) -> Grant | None:
        """Refuse a VM this node does not own (stand-alone servers own what they hold);
        a grant to use instead of ``grant`` for this VM, or None."""
        if self._ownership is not None:
            return await self._ownership(vmid, grant)
        return None

    async def store_for(self, storage: Path) -> ReplicaStore:
        """The replica store at ``storage``, opened (and recovered) on first use."""
        store = self._stores.get(storage)
        if store is not None:
            return store
        async with self._opening:
            store = self._stores.get(storage)
            if store is not None:
                return store  # opened while this one waited
            claimed = None
            if self._claim_storage:
                try:
                    claimed = claim(storage)
                except StorageBusy as exc:
                    # The lock names the storage's path: the log's, not the peer's.
                    raise fp.Busy(
                        "the storage location is held by another process", detail=str(exc)
                    ) from None
            try:
                store = ReplicaStore(
                    storage,
                    keep_points=self.config.recovery_points,
                    faults=self._faults,
                    io=self._file_io(storage) if self._file_io is not None else None,
                )
                for line in await trio.to_thread.run_sync(store.recover):
                    log.info("recovery at %s: %s", storage, line)
            except BaseException:
                if claimed is not None:
                    os.close(claimed)  # a later use may try again
                raise
            if claimed is not None:
                self._claims.append(claimed)
            self._stores[storage] = store
        return store

    def close(self) -> None:
        """Close every store opened and let the storage locks go: what the exit of the
        process does (a simulated server is killed and started again in one process)."""
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        claims, self._claims = self._claims, []
        for fd in claims:
            os.close(fd)

    def locations(self) -> list[Path]:
        """Every storage location this server serves: its authorization's, and any opened
        since (a reload may have dropped an entry whose replicas are still here)."""
        places = {e.storage for e in self.config.authorization.entries}
        if self.config.authorization.any_primary is not None:
            places.add(self.config.authorization.any_primary.storage)
        return sorted(places | set(self._stores))

    async def holders(self, vmid: uuid.UUID) -> list[ReplicaStore]:
        """The stores, over every location served, that hold a replica of ``vmid``."""
        found = []
        for storage in self.locations():
            store = await self.store_for(storage)
            if store.exists(vmid):
                found.append(store)
        return found

    async def locate(self, vmid: uuid.UUID, default: ReplicaStore) -> ReplicaStore:
        """Where the replica of ``vmid`` is, over every location served (REP-33): the store
        that holds it, or ``default`` when none does (a new replica goes there).

        Raises:
            frproto.Busy: two locations hold it (REP-34): it is not served until an
                operator removes one copy (``frctl replica remove-duplicate``).
        """
        found = await self.holders(vmid)
        if len(found) > 1:
            # Nothing is closed here: a session that opened the VM before the second copy
            # appeared goes on; only new creates and opens are refused.
            log.warning(
                "VM %s has a replica in %d storage locations (%s): refused until an operator "
                "removes one (frctl replica duplicates)",
                vmid,
                len(found),
                ", ".join(str(s.root) for s in found),
            )
            raise fp.Busy(
                f"VM {vmid} has two replicas on this server: it is not served until an "
                "operator removes one"
            )
        return found[0] if found else default

    def duplicates(self) -> dict[uuid.UUID, list[Path]]:
        """VMIDs with a replica in more than one of the stores opened, and where."""
        where: dict[uuid.UUID, list[Path]] = {}
        for storage, store in sorted(self._stores.items()):
            for vmid in store.vmids():
                where.setdefault(vmid, []).append(storage)
        return {vmid: places for vmid, places in where.items() if len(places) > 1}

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Recover every configured store, listen, and serve until cancelled."""
        for storage in self.locations():
            await self.store_for(storage)
        duplicates = await trio.to_thread.run_sync(self.duplicates)
        for vmid, places in duplicates.items():
            self.forget(vmid)  # recovery opened both copies: neither stays open
            log.error(
                "VM %s has a replica in %d storage locations (%s): it is refused until an "
                "operator removes one (frctl replica duplicates; frctl replica "
                "remove-duplicate %s --storage PATH --yes)",
                vmid,
                len(places),
                ", ".join(map(str, places)),
                vmid,
            )
        try:
            listeners = await network.current().listen(self.config.port, host=self.config.listen)
        except OSError as exc:
            # The system's words name no address ("Address already in use"): say which.
            where = f"{self.config.listen}:{self.config.port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from exc
        log.info(
            "recovery server %s listening on %s:%d",
            self.config.name,
            self.config.listen,
            network.bound_port(listeners[0]),
        )
        task_status.started(listeners)
        self.listening = True
        try:
            await trio.serve_listeners(self.handle, listeners)
        finally:
            self.listening = False

    def reload_authorization(self, path: Path) -> bool:
        """Read the authorization entries of the configuration file ``path`` again and use
        them for new connections (``frctl server run`` does it on SIGHUP). A file that does
        not load is refused and the entries in use are kept; False then (logged). Storage
        locations that are new are opened at their first use."""
        try:
            fresh = load_recovery_server_config(path)
        except ConfigError as exc:
            log.error("reload refused, the authorization entries in use are kept: %s", exc)
            return False
        old = self.config.authorization
        self.config = replace(self.config, authorization=fresh.authorization)
        log.info(
            "authorization reloaded from %s: %d entries (were %d)%s",
            path,
            len(fresh.authorization.entries),
            len(old.entries),
            ", any primary of our CA admitted" if fresh.authorization.any_primary else "",
        )
        return True

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection to its end (never raises for a peer's misbehaviour).

        A connection over a bound of ``config.connections`` is closed at once, before
        anything is read (TIM-12)."""
        self.gate.policy = self.config.connections  # a reloaded config's, for new ones
        with self.gate.admit(stream) as admission:
            if admission is None:
                self.metrics.failed("connection_limit")
                await trio.aclose_forcefully(stream)
                return
            await self._handle_admitted(stream, admission)

    async def _handle_admitted(self, stream: trio.abc.Stream, admission: Admission) -> None:
        try:
            await self._handle(stream, admission)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.info("connection ended: %s", exc or type(exc).__name__)
            self.metrics.failed(failure_reason(exc))
        except fp.RemoteProtocolError as exc:
            log.warning("protocol violation by peer: %s (%s)", exc, type(exc).code.name)
            self.metrics.failed(failure_reason(exc))
        except fp.FrprotoError as exc:
            log.warning("connection closed: %s", exc)
            self.metrics.failed(failure_reason(exc))
        except Exception as exc:
            # A failure nobody foresaw ends this connection, never the server (nor, on a
            # cluster node, the agent that shares its nursery): logged whole.
            log.exception("connection failed")
            self.metrics.failed(failure_reason(exc))
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, raw: trio.abc.Stream, admission: Admission) -> None:
        authorize = self._authorize or self.config.authorization.authorize
        cap = self._cap

        def route(name: str | None) -> tuple[fp.ServerPolicy, Authorizer]:
            answer = cap.answers(name) if cap is not None else None
            return answer or (self._policy, authorize)

        accepted = await accept(
            raw,
            self._ssl,
            self._policy,
            authorize,
            route=route,
            refused=self.metrics.failed,
            connections=self.config.connections,
            handshaken=admission.handshaken,
        )
        if accepted is None:
            return
        admission.negotiated()
        if cap is not None and cap.answers(accepted.requested_name) is not None:
            await cap.serve(accepted)
            return
        grant = accepted.grant
        log.info(
            "primary %s connected (trust group %s)", grant.identity.name, grant.identity.trust_group
        )
        store = await self.store_for(grant.storage)
        session = Session(self, accepted.conn, grant, store, metrics=self.metrics)
        try:
            await session.run()
        finally:
            session.release()

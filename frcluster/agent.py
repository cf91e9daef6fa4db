"""The node agent: a recovery node in a cluster, and a broker candidate.

Every recovery node runs one (``frctl node run --config node.toml``). It

* serves replication like a stand-alone recovery server, but answers negotiation as a
  ``CLUSTER_NODE`` and serves only the VMs the cluster store says it owns (anything else
  gets VM_NOT_HERE, so the primary asks the broker again);
* announces itself in the store under a lease (a node that stops renewing is down);
* watches the cluster settings and applies a change within seconds, logging what changed;
* campaigns for the broker's election and, while it holds it, runs the broker at the CAP
  (``broker/service.py``), running the ``cap_up``/``cap_down`` hooks around it;
* moves the replicas the broker asks it to move (``migration.py``), and fails VMs over
  to its replicas when an administrator asks (``failover.py``);
* serves the web console (``frconsole/``) over HTTPS with its own certificate when its
  configuration has a ``[console]`` table;
* when a primary deletes its relationship (RelationshipDelete), removes the VM's record
  from the store once the replica is gone, so that the broker forgets the VM (a later
  query for it places it anew: ``NEW``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

import frproto as fp
from broker.authorization import authorization_from_settings
from broker.cluster_view import read_settings
from broker.election import Election, Term
from broker.records import ElectionRecord, Keys, NodeRecord, RecordError, Settings, VMRecord
from broker.service import Broker
from broker.store import (
    ClusterStore,
    Compare,
    Delete,
    EventKind,
    LeaseExpired,
    Put,
    StoreError,
    open_store,
)
from frconsole import ReplicaReport
from frconsole.standalone import report_of
from frlink import network
from frlink.accept import Accepted
from frlink.authz import Grant
from frlink.http import serve_asgi
from frlink.identity import PrimaryIdentity
from frlink.tls import server_context, web_server_context
from node.config import RecoveryServerConfig
from node.recovery_server import RecoveryServer
from node.storage.fileio import FileIO
from node.storage.layout import ReplicaLayout
from node.storage.state import ReplicaState

from .config import ClusterNodeConfig
from .failover import FailoverRunner, record_planned_failover
from .failover_endings import FailoverEndingRunner
from .metrics import NodeCollector
from .migration import Migrator
from .planned_ask import PlannedAsks
from .reverse import ReverseRunner

log = logging.getLogger("frrep.node")

#: The trust group given to a peer node's connection (never a primary's: trust groups in
#: authorization entries cannot contain ':').
PEER_TRUST_GROUP = "cluster:node"


class ClusterNode:
    """One recovery node of a cluster (see the module docstring).

    Args:
        config: the node's configuration.
        ssl_context: overrides the server context built from ``config.tls`` (tests).
        rng: randomness for the broker's ``random`` placement (tests seed it).
        registry: where its metrics go (the process's registry; a private one if None).
        store: a cluster store to use instead of opening ``config.store_url`` (the
            simulation's: its leases on the simulated clock); the caller closes it.
        file_io: makes the storage engine's file layer (see :class:`RecoveryServer`).
    """

    def __init__(
        self,
        config: ClusterNodeConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
        registry: CollectorRegistry | None = None,
        store: ClusterStore | None = None,
        file_io: Callable[[Path], FileIO] | None = None,
    ) -> None:
        self.config = config
        #: The cluster store to use instead of opening ``config.store_url`` (the
        #: simulation's, its leases on the simulated clock); closed by the caller.
        self._given_store = store
        #: The storage engine's file layer (see :class:`RecoveryServer`).
        self._file_io = file_io
        self.registry = registry or CollectorRegistry()
        #: The cluster store answered the last request of the keepalive loop.
        self.store_reachable = False
        #: This node's record is in the store under a lease not known to have expired.
        self.registered = False
        self.keys = Keys(config.prefix)
        self._ssl = ssl_context or server_context(config.tls.cert, config.tls.key, config.tls.ca)
        self._rng = rng
        self.settings = Settings()
        #: The settings record's revision this node applies (announced in its record).
        self.settings_revision = 0
        self.port = 0
        self._store: ClusterStore | None = None
        self._server: RecoveryServer | None = None
        #: Each owned VM's record revision when this node last confirmed it owned it.
        self._confirmed: dict[uuid.UUID, int] = {}
        #: The cluster's nodes (refreshed with every keepalive): peers we admit.
        self._peers: set[str] = set()
        #: The broker, while this node holds the election.
        self.broker: Broker | None = None
        #: Planned failovers asked at the cluster (made by :meth:`run`).
        self.planned_asks: PlannedAsks | None = None
        self._lease = 0
        self._nursery: trio.Nursery
        self._serve_scope: trio.CancelScope

    @property
    def store(self) -> ClusterStore:
        """The cluster store (open while :meth:`run` runs)."""
        assert self._store is not None, "the node is not running"
        return self._store

    @property
    def server(self) -> RecoveryServer:
        """The node's recovery server (made by :meth:`run`)."""
        assert self._server is not None, "the node is not running"
        return self._server

    def _server_config(self, settings: Settings) -> RecoveryServerConfig:
        return RecoveryServerConfig(
            name=self.config.name,
            listen=self.config.listen,
            port=settings.port or self.config.port,  # the cluster's port, if it sets one
            tls=self.config.tls,
            authorization=authorization_from_settings(
                settings.authorization, self.config.storage, settings.default_storage
            ),
            recovery_points=settings.recovery_points,
            connections=self.config.connections,
        )

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled; ``task_status.started(port)`` once it serves."""
        given = self._given_store
        opened = contextlib.nullcontext(given) if given is not None else None
        async with opened or open_store(self.config.store_url) as store:
            self._store = store
            try:
                settings = await read_settings(store, self.keys)
                self._server_config(settings)
            except RecordError as exc:
                log.error("the cluster's settings are unusable (%s): starting with defaults", exc)
                settings = Settings()
            self.settings = settings
            self._server = RecoveryServer(
                self._server_config(settings),
                ssl_context=self._ssl,
                recovery_type=fp.RecoveryType.CLUSTER_NODE,
                ownership=self._check_owner,
                authorize=self._authorize,
                cap=self,
                # Shared storage is served by every node (ownership decides per VM).
                claim_storage=not self.config.shared_storage,
                on_deleted=self._vm_deleted,
                on_renamed=self._vm_renamed,
                # A planned failover (FailoverRequest) is recorded in the VM's record.
                on_failed_over=partial(
                    record_planned_failover, self.store, self.keys, self.config.name
                ),
                registry=self.registry,
                file_io=self._file_io,
            )
            # Planned failovers asked at the cluster travel on the primary's connection.
            self.planned_asks = PlannedAsks(store, self.keys, self.config.name)
            self._server.planned_asks = self.planned_asks
            NodeCollector(self, self.registry)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.port = await nursery.start(self._serve)
                await nursery.start(self._announce)
                nursery.start_soon(self._watch_settings)
                record = ElectionRecord(
                    holder=self.config.name,
                    cap_name=self.config.cap_name,
                    # No CAP address of its own: the CAP's name resolves to the broker's
                    # node (DNS), whose listener answers for it (SNI).
                    cap_address=self.config.cap_address or self.config.listen,
                    cap_port=self.config.cap_port if self.config.cap_address else self.port,
                )
                election = Election(store, self.keys, record, ttl=self.config.lease_ttl)
                nursery.start_soon(election.run, self._lead)
                nursery.start_soon(Migrator(self, store, self.keys).run)
                nursery.start_soon(FailoverRunner(self, store, self.keys).run)
                nursery.start_soon(FailoverEndingRunner(self, store, self.keys).run)
                nursery.start_soon(ReverseRunner(self, store, self.keys).run)
                if self.config.console_port is not None:
                    await self._start_console(nursery)
                log.info("node %s up at %s:%d", self.config.name, self.config.listen, self.port)
                task_status.started(self.port)

    def ready(self) -> str | None:
        """None when the node serves and is registered in the cluster store (``/readyz``),
        else why not."""
        if self._server is None or not self._server.listening:
            return "not listening"
        if not self.registered:
            return "not registered in the cluster store"
        return None

    async def _start_console(self, nursery: trio.Nursery, *, at_cap: bool = False) -> None:
        """Serve the web console on this node's address, or (``at_cap``: while this node
        runs the broker) on the CAP's own address, with the node's certificate (which
        names the CAP too)."""
        from frconsole import ConsoleSource, console_app

        config = self.config
        assert config.console_port is not None
        app = console_app(
            ConsoleSource(
                self.store, self.keys, config.name, config.store_url, self._replica_report
            )
        )
        host = config.cap_address if at_cap else (config.console_listen or config.listen)
        context = web_server_context(config.tls.cert, config.tls.key)
        port = await nursery.start(
            partial(serve_asgi, app, host=host, port=config.console_port, ssl_context=context)
        )
        where = "the CAP's " if at_cap else ""
        log.info("%s: console at %shttps://%s:%d/", config.name, where, host, port)

    async def _replica_report(self, vm: VMRecord) -> ReplicaReport | None:
        """What this node's storage says of the replica of ``vm`` (for the console):
        read from its state file, without opening (and so locking) the replica."""
        layout = ReplicaLayout(self.config.storage / vm.storage, uuid.UUID(vm.vmid))
        try:
            state = ReplicaState.from_bytes(await trio.Path(layout.state).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("VM %s: its replica's state cannot be read: %s", vm.vmid, exc)
            return None
        return report_of(state)

    def _console_at_cap(self) -> bool:
        """The console follows the broker to the CAP's own address, unless this node's
        console listens on every address already (then it answers there too)."""
        listen = self.config.console_listen
        return self.config.console_port is not None and listen not in ("0.0.0.0", "::")

    async def _serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The recovery server's listener, in a cancel scope of its own: a change of the
        ``port`` setting cancels it and starts it again on the new port."""
        with trio.CancelScope() as scope:
            self._serve_scope = scope
            async with trio.open_nursery() as inner:
                listeners = await inner.start(self.server.serve)
                task_status.started(network.bound_port(listeners[0]))

    async def _rebind(self, port: int) -> None:
        """Move the replication listener to ``port`` (the setting changed) and announce
        it; if the port cannot be had, stay on the old one."""
        old = self.port
        self._serve_scope.cancel()
        self.server.config = replace(self.server.config, port=port)
        try:
            self.port = await self._nursery.start(self._serve)
        except OSError as exc:
            log.error(
                "%s: cannot listen on port %d (%s): staying on %d", self.config.name, port, exc, old
            )
            self.server.config = replace(self.server.config, port=old)
            self.port = await self._nursery.start(self._serve)
        await self._publish()
        log.info("%s: now listening on %s:%d", self.config.name, self.config.listen, self.port)

    async def _publish(self) -> None:
        """Announce this node's record again (its port or applied settings changed); the
        next keepalive round tries again if the store cannot be reached now."""
        if self._lease:
            with contextlib.suppress(StoreError):
                await self.store.put(
                    self.keys.node(self.config.name),
                    self.node_record().to_json(),
                    lease=self._lease,
                )

    # -- membership -------------------------------------------------------------------------

    def node_record(self) -> NodeRecord:
        """What this node announces."""
        return NodeRecord(
            name=self.config.name,
            address=self.config.listen,
            port=self.port,
            capacity_bytes=self.config.capacity_bytes,
            storage=str(self.config.storage),
            shared_storage=self.config.shared_storage,
            settings_revision=self.settings_revision,
        )

    async def _announce(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node's record alive under a lease; announce again if it expired."""
        ttl = self.config.lease_ttl
        started = False
        while True:
            try:
                lease = await self.store.grant_lease(ttl)
                self._lease = lease
                await self.store.put(
                    self.keys.node(self.config.name), self.node_record().to_json(), lease=lease
                )
            except StoreError as exc:
                self.store_reachable = False
                log.warning("announcing %s: %s; retrying", self.config.name, exc)
                await trio.sleep(ttl / 4)
                continue
            self.store_reachable = self.registered = True
            if not started:
                task_status.started()
                started = True
            while True:
                await trio.sleep(ttl / 4)
                try:
                    await self.store.keepalive(lease)
                    kvs, _ = await self.store.range(self.keys.nodes)
                    self._peers = {kv.key.removeprefix(self.keys.nodes) for kv in kvs}
                    self.store_reachable = True
                except LeaseExpired:
                    self.store_reachable, self.registered = True, False
                    log.warning("%s: lease expired: announcing again", self.config.name)
                    break
                except StoreError as exc:
                    self.store_reachable = False
                    log.warning("%s: keepalive: %s", self.config.name, exc)

    # -- settings -------------------------------------------------------------------------

    async def _watch_settings(self) -> None:
        key = self.keys.settings
        while True:
            try:
                # Read with the store's revision and watch from just after it: a change
                # made between the read and the watch is replayed, never missed (a watch
                # "from now" after reading nothing lost the first settings now and then).
                kvs, revision = await self.store.range(key)
                for kv in kvs:
                    if kv.key == key:
                        self._apply(kv.value, kv.mod_revision)
                async with self.store.watch(key, start_revision=revision + 1) as events:
                    async for event in events:
                        if event.kind is EventKind.PUT:
                            self._apply(event.kv.value, event.kv.mod_revision)
            except StoreError as exc:
                log.warning("watching the settings: %s", exc)
                await trio.sleep(0.5)

    def _apply(self, raw: bytes, revision: int) -> None:
        try:
            new = Settings.from_json(raw)
            config = self._server_config(new)
        except RecordError as exc:
            log.error("settings not applied (kept the previous ones): %s", exc)
            return
        if revision != self.settings_revision:
            self.settings_revision = revision
            self._nursery.start_soon(self._publish)
        changes = self.settings.changes(new)
        if not changes:
            return
        self.settings = new
        server = self.server
        server.config = replace(config, port=server.config.port)
        if "port" in changes and new.port and new.port != self.port:
            self._nursery.start_soon(self._rebind, new.port)
        server.keep_points(new.recovery_points)
        for name, (old, value) in sorted(changes.items()):
            log.info("%s: setting %s changed: %r -> %r", self.config.name, name, old, value)

    # -- ownership ------------------------------------------------------------------------

    async def vm_record(self, vmid: uuid.UUID) -> tuple[VMRecord, int] | None:
        """The VM's record and its revision (None when the cluster has none)."""
        kv = await self.store.get(self.keys.vm(vmid))
        if kv is None:
            return None
        return VMRecord.from_json(kv.value), kv.mod_revision

    def _authorize(self, names: Sequence[str]) -> Grant:
        """The settings' authorization entries, and the cluster's own nodes (a node copies
        a replica to another, or completes an out-of-band IR, with its node certificate)."""
        try:
            return self.server.config.authorization.authorize(names)
        except fp.NotAuthorized:
            peer = next((n for n in names if n in self._peers), None)
            if peer is None:
                raise
            return Grant(PrimaryIdentity(peer, PEER_TRUST_GROUP), self.config.storage)

    async def _check_owner(self, vmid: uuid.UUID, grant: Grant) -> Grant | None:
        if not self.settings.recovery_enabled and grant.identity.trust_group != PEER_TRUST_GROUP:
            raise fp.NotAuthorized(f"recovery is disabled in this cluster ({self.config.name})")
        try:
            found = await self.vm_record(vmid)
        except StoreError as exc:
            raise fp.Busy(
                f"{self.config.name} cannot read the cluster store", detail=str(exc)
            ) from None
        me = self.config.name
        if found is None:
            raise fp.VMNotHere(f"{me} does not hold VM {vmid}: the cluster has no record of it")
        vm, revision = found
        if vm.deleted:
            raise fp.VMDeleted(f"the replica of {vmid} was deleted by an administrator")
        if grant.identity.trust_group == PEER_TRUST_GROUP:
            # A peer node: the owner copying the replica to us (we are its target), or a
            # node completing an out-of-band IR for a VM we own. It writes as the VM's own
            # primary: the replica stays bound to that primary's trust group.
            copying_in = vm.migrate_to == me and vm.owner == grant.identity.name
            if not (copying_in or vm.owner == me):
                raise fp.NotAuthorized(f"node {grant.identity.name} may not write VM {vmid} here")
            identity = PrimaryIdentity(vm.primary, vm.trust_group)
            if self.planned_asks is not None:
                self.planned_asks.forget(vmid)  # a peer is never asked (FailoverAsk)
            return Grant(identity, self.config.storage / vm.storage)
        if vm.owner != me:
            self.forget(vmid)
            raise fp.VMNotHere(f"{me} does not hold VM {vmid} (it is on {vm.owner})")
        if self.planned_asks is not None:
            self.planned_asks.note(vmid, vm)  # read for its primary: ask it? (FailoverAsk)
        if vm.trust_group and vm.trust_group != grant.identity.trust_group:
            # The VM is bound to the group its record names, wherever its replica is (or
            # before it is created): another group's primary, come straight to this node
            # with storage of its own, must not make a second replica (REP-9, REP-33).
            raise fp.NotAuthorized(
                f"VM {vmid} is bound to trust group {vm.trust_group!r}; primary "
                f"{grant.identity.name} is in {grant.identity.trust_group!r}"
            )
        if self._confirmed.get(vmid) != revision:
            # The record changed since we last served this VM (a move away and back, a
            # re-home): what we have open may be stale; read the replica from disk again.
            self.forget(vmid)
            self._confirmed[vmid] = revision
        return None

    async def remove_local_replica(self, vm: VMRecord) -> None:
        """Remove a replica that moved to another node (no tombstone: not deleted)."""
        store = await self.server.store_for(self.config.storage / vm.storage)
        vmid = uuid.UUID(vm.vmid)
        if store.exists(vmid):
            await trio.to_thread.run_sync(partial(store.delete, vmid, tombstone=False))

    def forget(self, vmid: uuid.UUID) -> None:
        """Drop any open handle on the VM's replica (its files may change hands)."""
        self.server.forget(vmid)

    async def _vm_deleted(self, vmid: uuid.UUID) -> None:
        """A primary deleted its relationship and the replica is gone from this node: the
        VM's record goes from the store (a compare-and-swap on the revision read), so the
        broker forgets it. Raises BUSY (the primary may ask again) when the store cannot
        be reached or the record keeps changing."""
        me = self.config.name
        key = self.keys.vm(vmid)
        try:
            for _ in range(10):
                kv = await self.store.get(key)
                if kv is None:
                    break
                vm = VMRecord.from_json(kv.value)
                if vm.owner != me or vm.deleted:
                    # Another node's now, or an administrator's deletion (which stays on
                    # record, so that the primary is told): not this node's to remove.
                    why = "deleted by an administrator" if vm.deleted else f"owned by {vm.owner}"
                    log.warning("VM %s removed here; its record (%s) is kept", vmid, why)
                    break
                result = await self.store.txn(
                    [Compare.mod_revision(key, "==", kv.mod_revision)], [Delete(key)], []
                )
                if result.succeeded:
                    log.info("VM %s (%s): its primary deleted it; record removed", vmid, vm.name)
                    break
            else:
                raise fp.Busy(f"the record of VM {vmid} kept changing; ask again")
        except StoreError as exc:
            raise fp.Busy(f"{me} cannot update the cluster store", detail=str(exc)) from None
        except RecordError as exc:
            raise fp.InternalError(
                f"the record of VM {vmid} is unreadable", detail=str(exc)
            ) from None
        self._confirmed.pop(vmid, None)

    async def _vm_renamed(self, vmid: uuid.UUID, name: str) -> None:
        """A resent create renamed the VM (REP-28): its record takes the name, for the
        console and the broker. Best effort: the replica has the name already, and the
        next create tries again; a failure is logged, never told to the primary."""
        key = self.keys.vm(vmid)
        try:
            for _ in range(10):
                kv = await self.store.get(key)
                if kv is None:
                    return
                vm = VMRecord.from_json(kv.value)
                if vm.owner != self.config.name or vm.name == name:
                    return
                result = await self.store.txn(
                    [Compare.mod_revision(key, "==", kv.mod_revision)],
                    [Put(key, replace(vm, name=name).to_json())],
                    [],
                )
                if result.succeeded:
                    # Our own change: what this node has open of the VM is not stale.
                    if self._confirmed.get(vmid) == kv.mod_revision:
                        self._confirmed[vmid] = result.revision
                    log.info("VM %s renamed %r (was %r)", vmid, name, vm.name)
                    return
            log.warning("VM %s: its record kept changing; the name %r is not recorded", vmid, name)
        except (StoreError, RecordError) as exc:
            log.warning("VM %s: the name %r is not recorded: %s", vmid, name, exc)

    # -- the broker -----------------------------------------------------------------------

    def answers(
        self, requested_name: str | None
    ) -> tuple[fp.ServerPolicy, Callable[[Sequence[str]], Grant]] | None:
        """For connections to this node's listener that ask for the CAP's name (SNI):
        the broker's answer if this node runs it, else a refusal with BUSY (the primary
        asks the CAP again and finds the broker where it is now)."""
        if requested_name != self.config.cap_name.lower().rstrip("."):
            return None
        policy = fp.ServerPolicy(fp.RecoveryType.CLUSTERING_BROKER, self.config.cap_name)
        broker = self.broker
        if broker is None:

            def refuse(names: Sequence[str]) -> Grant:
                raise fp.Busy(f"{self.config.name} does not run the broker now; ask again")

            return policy, refuse
        return broker.policy, Broker.authorizer(self.settings)

    async def serve(self, accepted: Accepted[Any]) -> None:
        """Answer queries on a connection that asked for the CAP at this node's address."""
        broker = self.broker
        if broker is None:
            return
        await broker.serve_queries(accepted.conn, accepted.grant)

    async def _lead(self, term: Term) -> None:
        """Run the broker at the CAP for as long as this node holds the election."""
        started = trio.current_time()  # the clock of its sleeps (a simulation's too)
        if self.config.cap_up:
            await self._hook("cap_up", self.config.cap_up)
        try:
            broker = Broker(
                self.store,
                self.keys,
                term,
                term.record,
                self._ssl,
                rng=self._rng,
                connections=self.config.connections,
            )
            self.broker = broker
            while True:
                try:
                    async with trio.open_nursery() as nursery:
                        own_address = bool(self.config.cap_address)
                        await nursery.start(partial(broker.serve, listen=own_address))
                        if own_address and self._console_at_cap():
                            try:
                                await self._start_console(nursery, at_cap=True)
                            except OSError as exc:
                                # The broker matters more than its console: serve on.
                                log.warning("no console at the CAP's address: %s", exc)
                        log.info(
                            "%s: broker serving at the CAP %s (%s:%d), %.2f s after the election",
                            self.config.name,
                            self.config.cap_name,
                            term.record.cap_address,
                            term.record.cap_port,
                            trio.current_time() - started,
                        )
                except* OSError as group:
                    # The address may still be held for a moment (the previous broker's
                    # node, a hook that has not run yet): try again within the term. The
                    # bind fails inside Broker.serve's nursery, so it comes in a group: a
                    # plain ``except OSError`` let it end the node agent.
                    first: BaseException = group
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    log.warning("binding the CAP: %s; retrying", first)
                    await trio.sleep(0.1)
        finally:
            self.broker = None
            if self.config.cap_down:
                with trio.CancelScope(shield=True):
                    await self._hook("cap_down", self.config.cap_down)

    async def _hook(self, what: str, command: str) -> None:
        result = await trio.run_process(
            command, shell=True, check=False, capture_stdout=True, capture_stderr=True
        )
        if result.returncode:
            log.error("%s hook %r failed (%d): %s", what, command, result.returncode, result.stderr)
        else:
            log.info("%s hook ran: %s", what, command)

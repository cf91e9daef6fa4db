"""The active clustering broker: listens at the CAP and answers QueryRecoveryServer.

Only the node that holds the election runs it (``frcluster/agent.py`` starts it in the
term's scope and the term's end cancels it). It answers a negotiation as
``CLUSTERING_BROKER`` under the CAP's name and then takes only QueryRecoveryServer:

* a VM the cluster holds: its owner's name and port, ``existing = EXISTING``;
* a VM an administrator deleted: ``existing = DELETED`` (the primary stops);
* a new VM: placed (``broker/placement.py``), recorded as a cluster resource with owner and
  storage, and its node returned with ``existing = NEW``.

Every write goes through :func:`broker.election.fenced_txn`: a deposed broker writes
nothing. Tracking (nodes that went down, nodes being drained) runs beside it
(``broker/tracking.py``).
"""

from __future__ import annotations

import logging
import random
import ssl
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from broker.authorization import authorization_from_settings
from broker.cluster_cache import ClusterCache
from broker.cluster_view import ClusterView
from broker.election import Term, fenced_txn
from broker.placement import NoCapacity, PlacementContext, PlacementError, PlacementRequest, place
from broker.records import ElectionRecord, Keys, RecordError, Settings, VMRecord
from broker.store import ClusterStore, Compare, Put, StoreError
from frlink import network
from frlink.accept import accept
from frlink.authz import Grant
from frlink.connections import ANSWERING_STATES, Admission, ConnectionPolicy, Gate
from frlink.wire_errors import wire_error
from frproto.trio_io import FramedStream, keep_alive

from .tracking import Tracker

log = logging.getLogger("frrep.broker")

#: Attempts at a compare-and-swap placement before giving up (another write raced it).
PLACE_ATTEMPTS = 8


class Broker:
    """The broker of one term.

    Args:
        store: the cluster store.
        keys: the cluster's keys.
        term: the election this broker holds (its writes are fenced by it).
        cap: where to listen (the election record names the CAP).
        ssl_context: a server context whose certificate names the CAP.
        rng: randomness for the ``random`` policy (tests seed it).
        connections: deadlines and connection bounds at the CAP (docs/protocol.md 10.2).
    """

    def __init__(
        self,
        store: ClusterStore,
        keys: Keys,
        term: Term,
        cap: ElectionRecord,
        ssl_context: ssl.SSLContext,
        *,
        rng: random.Random | None = None,
        connections: ConnectionPolicy | None = None,
    ) -> None:
        self.connections = connections or ConnectionPolicy()
        #: Counts the CAP listener's connections against the bounds (TIM-12).
        self.gate = Gate(self.connections)
        self.store = store
        self.keys = keys
        self.term = term
        self.cap = cap
        self._ssl = ssl_context
        self._rng = rng or random.Random()
        #: New VMs are placed one at a time: every placement advances the same cursor
        #: record, so concurrent ones would only lose its compare-and-swap to each other
        #: (and, past PLACE_ATTEMPTS, be refused BUSY). Queries for VMs it holds never wait.
        self._placing = trio.Lock()
        self._policy = fp.ServerPolicy(fp.RecoveryType.CLUSTERING_BROKER, cap.cap_name)
        self.cache = ClusterCache(store, keys)
        self.tracker = Tracker(store, keys, term, self.choose_node, self.cache)

    async def serve(
        self, *, listen: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen at the CAP and track the cluster until cancelled. ``listen=False``: the
        CAP has no address of its own (its name resolves to the broker node's address,
        whose listener answers for it by SNI): only track."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cache.run)
            nursery.start_soon(self.tracker.run)
            if not listen:
                log.info(
                    "broker (term %d) answering for %s by SNI", self.term.token, self.cap.cap_name
                )
                task_status.started([])
                return
            listeners = await network.current().listen(self.cap.cap_port, host=self.cap.cap_address)
            log.info(
                "broker (term %d) listening at the CAP %s (%s:%d)",
                self.term.token,
                self.cap.cap_name,
                self.cap.cap_address,
                self.cap.cap_port,
            )
            task_status.started(listeners)
            await trio.serve_listeners(self.handle, listeners)

    # -- connections ----------------------------------------------------------------------

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one primary's connection (never raises for a peer's misbehaviour); one
        over a bound of :attr:`connections` is closed at once (TIM-12)."""
        with self.gate.admit(stream) as admission:
            if admission is None:
                await trio.aclose_forcefully(stream)
                return
            await self._handle_admitted(stream, admission)

    async def _handle_admitted(self, stream: trio.abc.Stream, admission: Admission) -> None:
        try:
            await self._handle(stream, admission)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.info("connection ended: %s", exc or type(exc).__name__)
        except fp.FrprotoError as exc:
            log.warning("connection closed: %s", exc)
        except Exception:
            # One connection must never take the broker down (its listener shares the
            # node agent's nursery): log it whole and close this connection only.
            log.exception("broker connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    @property
    def policy(self) -> fp.ServerPolicy:
        """What the broker answers a negotiation with."""
        return self._policy

    @staticmethod
    def authorizer(settings: Settings) -> Callable[[Sequence[str]], Grant]:
        """The primaries ``settings`` admit (raises RecordError if the entries are bad)."""
        auth = authorization_from_settings(settings.authorization, Path(), settings.default_storage)

        def authorize(names: Sequence[str]) -> Grant:
            if not settings.recovery_enabled:
                raise fp.NotAuthorized("recovery is disabled in this cluster")
            return auth.authorize(names)

        return authorize

    async def _handle(self, raw: trio.abc.Stream, admission: Admission) -> None:
        # The settings as of now (authorize() runs inside the handshake: it cannot await).
        try:
            authorize = self.authorizer(self.cache.settings)
        except RecordError as exc:
            log.error("the cluster's authorization entries are unusable: %s", exc)
            return
        accepted = await accept(
            raw,
            self._ssl,
            self._policy,
            authorize,
            what="this broker",
            connections=self.connections,
            handshaken=admission.handshaken,
        )
        if accepted is None:
            return
        admission.negotiated()
        await self.serve_queries(accepted.conn, accepted.grant)

    async def serve_queries(self, conn: FramedStream, grant: Grant) -> None:
        """Answer QueryRecoveryServer on a negotiated connection until it closes; while a
        placement waits (the store, another placement), a Keepalive now and then (TIM-9)."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(keep_alive, conn, self.connections.keepalive, states=ANSWERING_STATES)
            )
            try:
                await self._answer_queries(conn, grant)
            except Exception as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure  # bare, not in an ExceptionGroup: the caller sorts errors by kind

    async def _answer_queries(self, conn: FramedStream, grant: Grant) -> None:
        while True:
            event = await conn.next_event()
            if isinstance(event, (fp.ConnectionClosed, fp.Error)):
                return
            if not isinstance(event, fp.QueryRecoveryServer):
                continue  # Keepalive; frproto refuses anything else at a broker
            try:
                try:
                    answer = await self.locate(event, grant)
                except StoreError as exc:
                    raise fp.Busy("the cluster store is unavailable", detail=str(exc)) from exc
            except fp.ReplicationError as exc:
                # An Error's text carries no internals (ERR-11): INTERNAL gets a generic
                # text with an incident id, the detail stays in the log.
                log.info("query for %s refused: %s", event.vmid, exc)
                await conn.send_error(wire_error(exc, log, what="QueryRecoveryServer"))
                continue
            await conn.send(answer)

    # -- queries --------------------------------------------------------------------------

    async def locate(
        self, query: fp.QueryRecoveryServer, grant: Grant
    ) -> fp.QueryRecoveryServerResponse:
        """Where ``query``'s VM lives, placing it first if the cluster does not hold it."""
        vmid = str(query.vmid)
        for _ in range(PLACE_ATTEMPTS):
            # From the in-memory copy: it is behind the store by the watch's latency at
            # most, and a stale answer costs one round trip, never data: the node checks
            # ownership and deletion in the store itself (VM_NOT_HERE / VM_DELETED).
            view = self.cache.view()
            vm = view.vms.get(vmid)
            if vm is None:
                async with self._placing:
                    view = self.cache.view()  # what the placement before this one did
                    if vmid in view.vms:
                        continue
                    placed = await self._place_new(view, query, grant)
                if isinstance(placed, int):
                    # Raced with another write: catch up with the store, then again.
                    await self.cache.wait_for(placed)
                    continue
                return self._answer(query.vmid, view, placed, fp.ExistingVM.NEW)
            if vm.deleted:
                log.info("VM %s was deleted by an administrator: told the primary", vmid)
                return fp.QueryRecoveryServerResponse(
                    query.vmid, self.cap.cap_name, self.cap.cap_port, fp.ExistingVM.DELETED
                )
            if vm.failover.in_force:
                # The VM runs from its replica now: its former primary must not write
                # to it (the node refuses it too, by the relationship's generation).
                raise fp.NotAuthorized(
                    f"VM {vmid} was failed over to {vm.owner} (generation "
                    f"{vm.failover_generation}): replication from its former primary is refused"
                )
            if vm.trust_group and vm.trust_group != grant.identity.trust_group:
                raise fp.NotAuthorized(
                    f"VM {vmid} is bound to trust group {vm.trust_group!r}; primary "
                    f"{grant.identity.name} is in {grant.identity.trust_group!r}"
                )
            if vm.owner in view.nodes:
                return self._answer(query.vmid, view, vm.owner, fp.ExistingVM.EXISTING)
            moved = await self.tracker.rehome(view, vm)
            if moved is None and vm.shared:
                await self.cache.wait_for(await self.store.revision())
                continue
            if moved is None:
                raise fp.Busy(
                    f"the node holding VM {vmid} ({vm.owner}) is down and its storage is "
                    "not shared: the replica is back when the node is"
                )
        raise fp.Busy(f"placing VM {vmid}: too many concurrent changes, try again")

    def _answer(
        self, vmid: uuid.UUID, view: ClusterView, node: str, existing: fp.ExistingVM
    ) -> fp.QueryRecoveryServerResponse:
        # ``node`` is in the view: placed from it, or checked to be up in it.
        return fp.QueryRecoveryServerResponse(vmid, node, view.nodes[node].record.port, existing)

    def choose_node(
        self,
        view: ClusterView,
        vm: VMRecord,
        *,
        exclude: Sequence[str] = (),
        shared_only: bool = False,
    ) -> str:
        """A node for ``vm`` under the current policy and rules (for tracking's moves)."""
        request = PlacementRequest(vm.vmid, vm.size_bytes, vm.trust_group, vm.primary)
        nodes = [
            n
            for n in view.nodes.values()
            if n.name not in exclude and (not shared_only or n.record.shared_storage)
        ]
        others = [v for v in view.vms.values() if v.vmid != vm.vmid]
        ctx = PlacementContext(nodes=nodes, vms=others, cursor=view.cursor)
        rules = self.cache.placement_rules(view)
        return place(
            request, ctx, policy=view.settings.placement_policy, rules=rules, rng=self._rng
        ).node

    async def _place_new(
        self, view: ClusterView, query: fp.QueryRecoveryServer, grant: Grant
    ) -> str | int:
        """Place a new VM: the node's name, or the store's revision when the
        compare-and-swap lost a race (the copy is behind it)."""
        request = PlacementRequest(
            vmid=str(query.vmid),
            size_bytes=sum(query.disk_sizes),
            trust_group=grant.identity.trust_group,
            primary=grant.identity.name,
        )
        ctx = PlacementContext(
            nodes=list(view.nodes.values()),
            vms=list(view.vms.values()),
            cursor=view.cursor,
            owned=view.owned,
        )
        try:
            rules = self.cache.placement_rules(view)
            placement = place(
                request, ctx, policy=view.settings.placement_policy, rules=rules, rng=self._rng
            )
        except NoCapacity as exc:
            raise fp.NoSpace(str(exc)) from None
        except PlacementError as exc:
            raise fp.InternalError("placement failed", detail=str(exc)) from None
        node = view.nodes[placement.node].record
        vm = VMRecord(
            vmid=request.vmid,
            owner=node.name,
            storage=str(grant.storage),
            primary=grant.identity.name,
            trust_group=grant.identity.trust_group,
            name=query.vm_name,
            size_bytes=request.size_bytes,
            shared=node.shared_storage,
        )
        key = self.keys.vm(request.vmid)
        result = await fenced_txn(
            self.store,
            self.keys,
            self.term,
            [
                Compare.create_revision(key, "==", 0),
                Compare.mod_revision(self.keys.placement, "==", view.cursor_revision),
            ],
            [Put(key, vm.to_json()), Put(self.keys.placement, placement.cursor.to_json())],
        )
        if not result.succeeded:
            return result.revision
        self.cache.put_vm(vm, result.revision)
        self.cache.put_cursor(placement.cursor, result.revision)
        log.info(
            "placed VM %s (%s) on %s: %s", request.vmid, query.vm_name, node.name, placement.reason
        )
        return node.name

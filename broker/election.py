"""Where the one active broker is elected, and how its writes are fenced.

Every node campaigns; the election record (``Keys.election``) is created only when absent
(a compare-and-swap on its ``create_revision`` being 0) and is attached to the winner's
lease. The winner keeps the lease alive; when it dies the lease expires after ``ttl``
seconds, the store deletes the record, every watcher sees the DELETE and campaigns again.

**Fencing.** A term's token is the record's ``create_revision``: a later election creates
the record anew, with a higher revision. Every write the broker makes goes through
:func:`fenced_txn`, which adds the compare "the election record still has my token" to the
transaction. A deposed broker (paused, partitioned, its lease expired while it still
believes it leads) cannot write: its transaction fails and it gets :class:`Deposed`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio

from broker.records import ElectionRecord, Keys
from broker.store import (
    ClusterStore,
    Compare,
    EventKind,
    Get,
    LeaseExpired,
    Op,
    Put,
    StoreError,
    StoreUnavailable,
    TxnResult,
)

log = logging.getLogger("frrep.election")

#: Seconds a broker's lease lives without a keepalive: how long a dead broker's node
#: keeps the election before another node can take it.
DEFAULT_TTL = 2.0


class Deposed(Exception):
    """This broker no longer holds the election: its write was refused."""


@dataclass(frozen=True)
class Term:
    """A won election."""

    token: int  #: the election record's create_revision: the fencing token
    lease: int
    record: ElectionRecord


async def fenced_txn(
    store: ClusterStore,
    keys: Keys,
    term: Term,
    compares: Sequence[Compare],
    success: Sequence[Op],
    failure: Sequence[Op] = (),
) -> TxnResult:
    """Run a transaction only while ``term`` still holds the election.

    Returns the result (``succeeded`` False when one of the caller's own compares failed).

    Raises:
        Deposed: the election record is gone or belongs to a later term; nothing was
            written.
    """
    fence = Compare.create_revision(keys.election, "==", term.token)
    result = await store.txn([fence, *compares], list(success), [Get(keys.election), *failure])
    if not result.succeeded:
        current = result.responses[0] if result.responses else None
        if current is None or current.create_revision != term.token:
            raise Deposed(f"the broker's term {term.token} is over; the write was refused")
        result = TxnResult(False, result.revision, result.responses[1:])
    return result


async def current_holder(store: ClusterStore, keys: Keys) -> ElectionRecord | None:
    """The broker elected now, if any."""
    kv = await store.get(keys.election)
    return None if kv is None else ElectionRecord.from_json(kv.value)


class Election:
    """One node's candidacy: campaign, hold the term while alive, campaign again.

    Args:
        store: the cluster store.
        keys: the cluster's keys.
        record: what this node writes when it wins (its name, and the CAP it will serve).
        ttl: the lease's time to live (seconds).
    """

    def __init__(
        self, store: ClusterStore, keys: Keys, record: ElectionRecord, *, ttl: float = DEFAULT_TTL
    ) -> None:
        self.store = store
        self.keys = keys
        self.record = record
        self.ttl = ttl
        self.term: Term | None = None

    async def run(self, lead: Callable[[Term], Awaitable[None]]) -> None:
        """Campaign forever. Each time this node wins, run ``lead(term)``; it is cancelled
        as soon as the term is known to be lost (keepalive refused or the record changed).
        ``lead`` returning ends the term (the record is released) and campaigning goes
        on."""
        while True:
            term = await self._campaign()
            self.term = term
            log.info("%s elected broker (term %d)", self.record.holder, term.token)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._hold, term, nursery.cancel_scope)
                    await lead(term)
                    nursery.cancel_scope.cancel()
            finally:
                self.term = None
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._release(term)
            log.info("%s is no longer the broker (term %d)", self.record.holder, term.token)

    async def _campaign(self) -> Term:
        key = self.keys.election
        while True:
            try:
                lease = await self.store.grant_lease(self.ttl)
                result = await self.store.txn(
                    [Compare.create_revision(key, "==", 0)],
                    [Put(key, self.record.to_json(), lease=lease)],
                    [Get(key)],
                )
            except StoreError as exc:
                log.warning("campaign: %s; retrying", exc)
                await trio.sleep(self.ttl / 4)
                continue
            if result.succeeded:
                return Term(result.revision, lease, self.record)
            await self._revoke_quietly(lease)
            holder = result.responses[0] if result.responses else None
            since = holder.mod_revision + 1 if holder is not None else 0
            await self._wait_for_vacancy(since)

    async def _wait_for_vacancy(self, since: int) -> None:
        """Return when the election record is deleted (or after a while, to re-check:
        a watch that broke must not leave this node waiting forever)."""
        with trio.move_on_after(self.ttl * 2):
            try:
                async with self.store.watch(self.keys.election, start_revision=since) as events:
                    async for event in events:
                        if event.kind is EventKind.DELETE and event.kv.key == self.keys.election:
                            return
            except StoreError as exc:
                log.debug("watch of the election record: %s", exc)
                await trio.sleep(self.ttl / 4)

    async def _hold(self, term: Term, scope: trio.CancelScope) -> None:
        """Keep the lease alive; cancel ``scope`` once the term is known to be lost."""
        interval = self.ttl / 4
        deadline = trio.current_time() + self.ttl
        try:
            while True:
                await trio.sleep(interval)
                try:
                    remaining = await self.store.keepalive(term.lease)
                except LeaseExpired:
                    log.warning("term %d: lease expired", term.token)
                    return
                except StoreUnavailable as exc:
                    # The lease may still be alive in the store; only once a whole TTL
                    # has passed without a renewal is it certainly gone.
                    if trio.current_time() >= deadline:
                        log.warning(
                            "term %d: store unreachable for a whole TTL (%s)", term.token, exc
                        )
                        return
                    continue
                if not math.isfinite(remaining) or remaining <= 0:
                    return
                deadline = trio.current_time() + min(remaining, self.ttl)
                kv = await self.store.get(self.keys.election)
                if kv is None or kv.create_revision != term.token:
                    log.warning("term %d: the election record changed", term.token)
                    return
        finally:
            scope.cancel()

    async def _release(self, term: Term) -> None:
        # Revoking the lease deletes our record at once (never someone else's: a later
        # term's record is on its own lease), rather than making the cluster wait for the
        # lease to expire.
        await self._revoke_quietly(term.lease)

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self.store.revoke(lease)
        except StoreError as exc:
            log.debug("revoke lease %d: %s", lease, exc)

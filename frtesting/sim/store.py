"""A node's view of the cluster store in the simulation: the real store behind a link that
can be cut (a partition of that node from the store), and a witness of fenced writes.

:class:`NodeStore` delegates every call to the shared :class:`~broker.store.SqliteStore`
(its leases on the simulated clock); while :attr:`NodeStore.cut` it raises
``StoreUnavailable`` instead, as a client cut off from etcd would. Every transaction that
succeeded under a broker's fence (a compare of the election record's create revision, see
``broker.election.fenced_txn``) is noted in :class:`FencedWrites`, for invariant #2.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from broker.store import ClusterStore, Compare, StoreUnavailable
from broker.store.base import CompareTarget, KeyValue, Op, TxnResult, WatchEvent


@dataclass
class FencedWrites:
    """Every fenced transaction accepted: (store revision, term token, node)."""

    election_key: str
    accepted: list[tuple[int, int, str]] = field(default_factory=list)

    def violations(self) -> list[str]:
        """#2: a write fenced by a term accepted after a later term's write (two brokers'
        fenced writes accepted in the same stretch of time)."""
        found = []
        newest = (0, 0, "")
        for revision, token, node in sorted(self.accepted):
            if token < newest[1]:
                found.append(
                    f"#2 {node}: a write of term {token} accepted at revision {revision}, "
                    f"after term {newest[1]}'s (by {newest[2]}) at revision {newest[0]}"
                )
            else:
                newest = (revision, token, node)
        return found


class NodeStore(ClusterStore):
    """One node's client of the shared store (see the module docstring)."""

    def __init__(self, inner: ClusterStore, node: str, witness: FencedWrites) -> None:
        self.inner, self.node, self.witness = inner, node, witness
        self.cut = False

    def _check(self) -> None:
        if self.cut:
            raise StoreUnavailable(f"{self.node} is cut off from the cluster store (simulated)")

    async def get(self, key: str) -> KeyValue | None:
        self._check()
        return await self.inner.get(key)

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._check()
        return await self.inner.range(prefix)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._check()
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> int:
        self._check()
        return await self.inner.delete(key)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        self._check()
        result = await self.inner.txn(compares, success, failure)
        self._check()  # the answer is lost too when the link was cut meanwhile
        if result.succeeded and success:
            for compare in compares:
                if (
                    compare.key == self.witness.election_key
                    and compare.target is CompareTarget.CREATE
                    and isinstance(compare.operand, int)
                    and compare.operand > 0
                ):
                    self.witness.accepted.append((result.revision, compare.operand, self.node))
        return result

    @contextlib.asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        self._check()
        async with self.inner.watch(prefix, start_revision=start_revision) as events:
            yield self._events(events)

    async def _events(self, events: AsyncIterator[WatchEvent]) -> AsyncIterator[WatchEvent]:
        async for event in events:
            self._check()
            yield event

    def watch(
        self, prefix: str, *, start_revision: int
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        return self._watch(prefix, start_revision)

    async def grant_lease(self, ttl_s: float) -> int:
        self._check()
        return await self.inner.grant_lease(ttl_s)

    async def keepalive(self, lease_id: int) -> float:
        self._check()
        return await self.inner.keepalive(lease_id)

    async def revoke(self, lease_id: int) -> None:
        self._check()
        await self.inner.revoke(lease_id)

    async def revision(self) -> int:
        self._check()
        return await self.inner.revision()

    async def compact(self, revision: int) -> None:
        self._check()
        await self.inner.compact(revision)

    async def aclose(self) -> None:
        await self.inner.aclose()

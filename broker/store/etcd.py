"""The distributed cluster store: etcd v3 (>= 3.4) through its JSON gateway, with httpx on Trio.

Why the gateway and not gRPC: no PyPI etcd client is Trio-native (they are sync-with-threads
or asyncio), while ``httpx.AsyncClient`` runs on Trio natively and the gateway needs no
grpcio/protobuf pins.

`EtcdStore` maps the store's operations onto gateway requests; the rest is in modules of its
own:

- ``etcd_gateway.py``: the transport: POSTs with failover between the members, the
  ``hasleader`` header, error answers (`EtcdError`), and which requests may be retried;
- ``etcd_json.py``: the gateway's encoding (base64 keys and values, int64 as strings, proto3's
  omitted defaults);
- ``etcd_watch.py``: watches, one NDJSON stream each, reconnected from the next revision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from .base import (
    ClusterStore,
    Compare,
    Delete,
    Get,
    KeyValue,
    LeaseExpired,
    Op,
    Put,
    TxnResult,
    WatchEvent,
    check_branch,
)
from .etcd_gateway import EtcdError, Gateway
from .etcd_json import b64, compare_json, key_range, kv_of, op_json, revision_of
from .etcd_watch import Watcher

__all__ = ["EtcdStore"]


class EtcdStore(ClusterStore):
    """`ClusterStore` on an etcd v3 cluster (>= 3.4), talking to its JSON gateway.

    ``endpoints`` are ``host:port`` (plain HTTP) or full ``http(s)://host:port`` URLs of the
    members' client URLs. ``request_timeout`` bounds one operation including its failovers;
    ``connect_timeout`` bounds one connection attempt, so a dead member costs at most that;
    ``attempt_timeout`` bounds one attempt of a retry-safe request before it moves on to the
    next member (a follower can sit on a write forwarded to a leader that just died until
    etcd's own ~5 s request timeout). Opening does no I/O.

    Delivery: a `put` or `delete` cut off by a member failure is sent again to another member,
    so it may be applied twice (same final state, one more revision and watch event). A `txn`
    is never repeated blindly: when its outcome is unknown it raises `StoreUnavailable`, and
    the caller re-reads (its fencing compares make that safe).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout: float = 10.0,
        connect_timeout: float = 1.0,
        attempt_timeout: float = 2.0,
    ) -> None:
        self._gateway = Gateway(
            endpoints,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            attempt_timeout=attempt_timeout,
        )

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoints!r})"

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs, ``http(s)://host:port``."""
        return self._gateway.endpoints

    @property
    def request_timeout(self) -> float:
        """Seconds one operation may take, failovers included."""
        return self._gateway.request_timeout

    @property
    def connect_timeout(self) -> float:
        """Seconds one connection attempt may take."""
        return self._gateway.connect_timeout

    @property
    def attempt_timeout(self) -> float:
        """Seconds one attempt of a retry-safe request may take before the next member."""
        return self._gateway.attempt_timeout

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KeyValue | None:
        """See `ClusterStore.get`."""
        Get(key)
        data = await self._gateway.call("kv/range", {"key": b64(key)}, retry_safe=True)
        kvs = data.get("kvs") or []
        return kv_of(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """See `ClusterStore.range`."""
        key, end = key_range(prefix)
        data = await self._gateway.call("kv/range", {"key": key, "range_end": end}, retry_safe=True)
        return [kv_of(kv) for kv in data.get("kvs") or []], revision_of(data)

    async def revision(self) -> int:
        """See `ClusterStore.revision`."""
        body = {"key": b64(b"\0"), "count_only": True}
        return revision_of(await self._gateway.call("kv/range", body, retry_safe=True))

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """See `ClusterStore.put`."""
        op = Put(key, value, lease)
        try:
            data = await self._gateway.call("kv/put", op_json(op)["request_put"], retry_safe=True)
        except EtcdError as exc:
            if exc.lease_not_found:
                raise LeaseExpired(lease) from exc
            raise
        return revision_of(data)

    async def delete(self, key: str) -> int:
        """See `ClusterStore.delete`."""
        Delete(key)
        data = await self._gateway.call("kv/deleterange", {"key": b64(key)}, retry_safe=True)
        return revision_of(data)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """See `ClusterStore.txn`."""
        check_branch(success)
        check_branch(failure)
        body = {
            "compare": [compare_json(c) for c in compares],
            "success": [op_json(op) for op in success],
            "failure": [op_json(op) for op in failure],
        }
        try:
            data = await self._gateway.call("kv/txn", body, retry_safe=False)
        except EtcdError as exc:
            if exc.lease_not_found:
                leases = [op.lease for op in (*success, *failure) if isinstance(op, Put)]
                raise LeaseExpired(next((x for x in leases if x), 0)) from exc
            raise
        responses: list[KeyValue | None] = []
        for item in data.get("responses") or []:
            if "response_range" in item:
                kvs = item["response_range"].get("kvs") or []
                responses.append(kv_of(kvs[0]) if kvs else None)
        return TxnResult(bool(data.get("succeeded", False)), revision_of(data), responses)

    async def compact(self, revision: int) -> None:
        """See `ClusterStore.compact` (a physical compaction: done when this returns)."""
        body = {"revision": str(revision), "physical": True}
        try:
            await self._gateway.call("kv/compaction", body, retry_safe=True)
        except EtcdError as exc:
            if exc.compacted:
                return
            if exc.future_revision:
                raise ValueError(f"cannot compact to future revision {revision}") from exc
            raise

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl_s: float) -> int:
        """See `ClusterStore.grant_lease`. etcd grants whole seconds (rounded up) and may
        raise the TTL to its minimum (1.5 x election timeout)."""
        if not ttl_s > 0:
            raise ValueError("a lease TTL must be positive")
        ttl = max(1, -int(-ttl_s // 1))  # ceil
        data = await self._gateway.call("lease/grant", {"TTL": str(ttl)}, retry_safe=True)
        return int(data["ID"])

    async def keepalive(self, lease_id: int) -> float:
        """See `ClusterStore.keepalive`."""
        try:
            data = await self._gateway.call(
                "lease/keepalive", {"ID": str(lease_id)}, retry_safe=True
            )
        except EtcdError as exc:
            if exc.lease_not_found:
                raise LeaseExpired(lease_id) from exc
            raise
        ttl = int(data.get("result", data).get("TTL", 0))
        if ttl <= 0:  # proto3: an absent TTL means the lease is gone
            raise LeaseExpired(lease_id)
        return float(ttl)

    async def revoke(self, lease_id: int) -> None:
        """See `ClusterStore.revoke`."""
        try:
            await self._gateway.call("lease/revoke", {"ID": str(lease_id)}, retry_safe=True)
        except EtcdError as exc:
            if not exc.lease_not_found:
                raise

    # ------------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, prefix: str, *, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        """See `ClusterStore.watch`. Survives member failures by reconnecting elsewhere."""
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        key, end = key_range(prefix)
        watcher = Watcher(self._gateway, key, end, start_revision)
        try:
            if start_revision:
                await watcher.check_compacted()
            await watcher.connect()
            yield watcher
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await watcher.aclose()

    async def aclose(self) -> None:
        """See `ClusterStore.aclose`."""
        await self._gateway.aclose()

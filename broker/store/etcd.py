"""The distributed cluster store: etcd v3 (>= 3.4) through its JSON gateway, with httpx on Trio.

Why the gateway and not gRPC: no PyPI etcd client is Trio-native (they are sync-with-threads
or asyncio), while ``httpx.AsyncClient`` runs on Trio natively and the gateway needs no
grpcio/protobuf pins. The gateway's JSON has its quirks, handled here:

- keys, values and ``range_end`` are base64; int64 fields (revisions, lease ids, TTLs) are
  JSON strings;
- proto3 default values are omitted: a failed txn has no ``succeeded``, an empty range no
  ``kvs``, a PUT event no ``type``, a keepalive on a dead lease no ``TTL``;
- a watch is an NDJSON stream: ``created`` first, events, and errors in-stream
  (``{"error": ...}``); a compacted start revision gives ``canceled`` + ``compact_revision``
  while the HTTP stream stays open; the stream simply ends on a graceful etcd shutdown. Any end
  of stream is treated as "reconnect (to the next endpoint) from the last revision + 1";
- every request carries ``Grpc-Metadata-hasleader: true``, without which a watch on a member
  that lost quorum hangs silently forever.

Failover: requests go to the current endpoint; on a failure the client moves to the next
endpoint and retries, within ``request_timeout``. Reads, keepalives, revokes, lease grants and
blind puts/deletes are retried on any transport error, "unavailable" answer or slow attempt
(repeating them leaves the same state; a put may then show up as two revisions). A txn is
retried only when it surely did not reach etcd (connection refused, no leader), because a
repeated CAS could report failure for a write that succeeded: when its outcome is unknown it
raises `StoreUnavailable` saying so.
"""

from __future__ import annotations

import base64
import collections
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import trio

from .base import (
    ClusterStore,
    Compacted,
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    EventKind,
    Get,
    KeyValue,
    LeaseExpired,
    Op,
    Put,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
    check_branch,
    prefix_range_end,
)

__all__ = ["EtcdStore"]

JSON = dict[str, Any]

# gRPC status codes etcd puts in its error bodies.
_NOT_FOUND: Final = 5
_OUT_OF_RANGE: Final = 11
_UNAVAILABLE: Final = 14
_DEADLINE_EXCEEDED: Final = 4

_RESULT = {
    CompareOp.EQUAL: "EQUAL",
    CompareOp.NOT_EQUAL: "NOT_EQUAL",
    CompareOp.LESS: "LESS",
    CompareOp.GREATER: "GREATER",
}
_TARGET_FIELD = {
    CompareTarget.MOD: "mod_revision",
    CompareTarget.CREATE: "create_revision",
    CompareTarget.VERSION: "version",
    CompareTarget.VALUE: "value",
}

# Connection never established: safe to retry anything on another endpoint.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _key_range(prefix: str) -> tuple[str, str]:
    """``key`` and ``range_end`` (base64) selecting every key that starts with ``prefix``."""
    start = prefix.encode("utf-8")
    end = prefix_range_end(start)
    # "\0" as key = from the first key; "\0" as range_end = no upper bound (etcd's convention).
    return _b64(start or b"\0"), _b64(end or b"\0")


def _kv(data: JSON) -> KeyValue:
    return KeyValue(
        key=_unb64(data.get("key")).decode("utf-8"),
        value=_unb64(data.get("value")),
        create_revision=int(data.get("create_revision", 0)),
        mod_revision=int(data.get("mod_revision", 0)),
        version=int(data.get("version", 0)),
        lease=int(data.get("lease", 0)),
    )


def _revision(data: JSON) -> int:
    return int(data.get("header", {}).get("revision", 0))


def _compare_json(compare: Compare) -> JSON:
    field = _TARGET_FIELD[compare.target]
    operand = compare.operand
    return {
        "key": _b64(compare.key),
        "target": compare.target.value,
        "result": _RESULT[compare.op],
        field: _b64(operand) if isinstance(operand, bytes) else str(operand),
    }


def _op_json(op: Op) -> JSON:
    if isinstance(op, Put):
        return {
            "request_put": {"key": _b64(op.key), "value": _b64(op.value), "lease": str(op.lease)}
        }
    if isinstance(op, Delete):
        return {"request_delete_range": {"key": _b64(op.key)}}
    return {"request_range": {"key": _b64(op.key)}}


class _EtcdError(StoreError):
    """An error answer from etcd (HTTP status, gRPC code, message)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"etcd: {message} (HTTP {status}, code {code})")
        self.status = status
        self.code = code
        self.message = message

    @property
    def unavailable(self) -> bool:
        return self.status == 503 or self.code in {_UNAVAILABLE, _DEADLINE_EXCEEDED}

    @property
    def no_leader(self) -> bool:
        return "no leader" in self.message

    @property
    def compacted(self) -> bool:
        return self.code == _OUT_OF_RANGE and "compacted" in self.message

    @property
    def future_revision(self) -> bool:
        return self.code == _OUT_OF_RANGE and "future revision" in self.message

    @property
    def lease_not_found(self) -> bool:
        return self.code == _NOT_FOUND and "lease not found" in self.message


def _parse_body(response: httpx.Response) -> JSON:
    text = response.text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        # Streaming endpoints (lease keepalive) answer NDJSON: take the first line.
        try:
            data = json.loads(text.splitlines()[0]) if text else {}
        except ValueError:
            raise _EtcdError(response.status_code, 0, text[:200] or "empty answer") from None
    if not isinstance(data, dict):
        raise _EtcdError(response.status_code, 0, f"unexpected answer {text[:200]}")
    return data


def _error_of(status: int, data: JSON) -> _EtcdError | None:
    """The error carried by an answer (unary or in-stream shape), if any."""
    error = data.get("error")
    if isinstance(error, dict):  # in-stream shape: {"error": {"grpc_code", "http_code", ...}}
        return _EtcdError(
            int(error.get("http_code", status)),
            int(error.get("grpc_code", 0)),
            str(error.get("message", error)),
        )
    if status != 200 or error is not None:
        message = data.get("message") or error or f"HTTP {status}"
        return _EtcdError(status, int(data.get("code", 0)), str(message))
    return None


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
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e if "://" in e else f"http://{e}" for e in endpoints]
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.attempt_timeout = attempt_timeout
        self._current = 0
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            # The hasleader header makes a member without quorum answer "no leader" instead
            # of hanging. trust_env=False: a proxy from the environment must not sit between
            # the broker and its store.
            headers={"Grpc-Metadata-hasleader": "true"},
            trust_env=False,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"EtcdStore({self.endpoints!r})"

    # ------------------------------------------------------------------ plumbing

    def _endpoint(self) -> str:
        return self.endpoints[self._current]

    def _rotate(self, failed: str) -> None:
        """Move on from a failed endpoint (unless a concurrent failure already did)."""
        if self.endpoints[self._current] == failed:
            self._current = (self._current + 1) % len(self.endpoints)

    async def _call(self, path: str, body: JSON, *, retry_safe: bool) -> JSON:
        """POST ``/v3/<path>`` with failover; returns the answer or raises `_EtcdError`.

        ``retry_safe``: repeating the request cannot change its meaning (reads, keepalive,
        revoke, and blind puts/deletes whose repetition leaves the same state), so any
        transport error, "unavailable" answer or slow attempt (``attempt_timeout``) moves on to
        the next endpoint. Otherwise (txn) only a request that surely never reached etcd is
        retried; an unknown outcome raises `StoreUnavailable`.
        """
        if self._closed:
            raise StoreError("the store is closed")
        deadline = trio.current_time() + self.request_timeout
        delay = 0.05
        last = "no answer"
        while True:
            for _ in range(len(self.endpoints)):
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    break
                endpoint = self._endpoint()
                attempt = min(remaining, self.attempt_timeout) if retry_safe else remaining
                timeout = httpx.Timeout(attempt, connect=min(attempt, self.connect_timeout))
                try:
                    response = await self._client.post(
                        f"{endpoint}/v3/{path}", json=body, timeout=timeout
                    )
                except _NOT_SENT as exc:
                    last = f"{endpoint}: {exc!r}"
                    self._rotate(endpoint)
                    continue
                except httpx.TransportError as exc:
                    if not retry_safe:
                        raise StoreUnavailable(
                            f"etcd {endpoint}: {exc!r} during {path}: it may or may not have "
                            "been applied"
                        ) from exc
                    last = f"{endpoint}: {exc!r}"
                    self._rotate(endpoint)
                    continue
                data = _parse_body(response)
                error = _error_of(response.status_code, data)
                if error is None:
                    return data
                if error.unavailable and (retry_safe or error.no_leader):
                    last = f"{endpoint}: {error}"
                    self._rotate(endpoint)
                    continue
                if error.unavailable:
                    raise StoreUnavailable(
                        f"{error} during {path}: it may or may not have been applied"
                    ) from error
                raise error
            if trio.current_time() + delay > deadline:
                raise StoreUnavailable(
                    f"no etcd endpoint answered {path} within {self.request_timeout} s "
                    f"(last: {last})"
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> KeyValue | None:
        """See `ClusterStore.get`."""
        Get(key)
        data = await self._call("kv/range", {"key": _b64(key)}, retry_safe=True)
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> tuple[list[KeyValue], int]:
        """See `ClusterStore.range`."""
        key, end = _key_range(prefix)
        data = await self._call("kv/range", {"key": key, "range_end": end}, retry_safe=True)
        return [_kv(kv) for kv in data.get("kvs") or []], _revision(data)

    async def revision(self) -> int:
        """See `ClusterStore.revision`."""
        body = {"key": _b64(b"\0"), "count_only": True}
        return _revision(await self._call("kv/range", body, retry_safe=True))

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """See `ClusterStore.put`."""
        op = Put(key, value, lease)
        try:
            data = await self._call("kv/put", _op_json(op)["request_put"], retry_safe=True)
        except _EtcdError as exc:
            if exc.lease_not_found:
                raise LeaseExpired(lease) from exc
            raise
        return _revision(data)

    async def delete(self, key: str) -> int:
        """See `ClusterStore.delete`."""
        Delete(key)
        data = await self._call("kv/deleterange", {"key": _b64(key)}, retry_safe=True)
        return _revision(data)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> TxnResult:
        """See `ClusterStore.txn`."""
        check_branch(success)
        check_branch(failure)
        body = {
            "compare": [_compare_json(c) for c in compares],
            "success": [_op_json(op) for op in success],
            "failure": [_op_json(op) for op in failure],
        }
        try:
            data = await self._call("kv/txn", body, retry_safe=False)
        except _EtcdError as exc:
            if exc.lease_not_found:
                leases = [op.lease for op in (*success, *failure) if isinstance(op, Put)]
                raise LeaseExpired(next((x for x in leases if x), 0)) from exc
            raise
        responses: list[KeyValue | None] = []
        for item in data.get("responses") or []:
            if "response_range" in item:
                kvs = item["response_range"].get("kvs") or []
                responses.append(_kv(kvs[0]) if kvs else None)
        return TxnResult(bool(data.get("succeeded", False)), _revision(data), responses)

    async def compact(self, revision: int) -> None:
        """See `ClusterStore.compact` (a physical compaction: done when this returns)."""
        body = {"revision": str(revision), "physical": True}
        try:
            await self._call("kv/compaction", body, retry_safe=True)
        except _EtcdError as exc:
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
        data = await self._call("lease/grant", {"TTL": str(ttl)}, retry_safe=True)
        return int(data["ID"])

    async def keepalive(self, lease_id: int) -> float:
        """See `ClusterStore.keepalive`."""
        try:
            data = await self._call("lease/keepalive", {"ID": str(lease_id)}, retry_safe=True)
        except _EtcdError as exc:
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
            await self._call("lease/revoke", {"ID": str(lease_id)}, retry_safe=True)
        except _EtcdError as exc:
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
        key, end = _key_range(prefix)
        watcher = _Watcher(self, key, end, start_revision)
        try:
            if start_revision:
                await self._check_watchable(key, end, start_revision, watcher)
            await watcher.connect()
            yield watcher
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await watcher.aclose()

    async def _check_watchable(self, key: str, end: str, revision: int, watcher: _Watcher) -> None:
        """Raise `Compacted` now if ``revision`` is compacted (etcd would tell the watch only
        a while after creating it)."""
        body = {"key": key, "range_end": end, "revision": str(revision), "limit": "1"}
        try:
            await self._call("kv/range", body, retry_safe=True)
        except _EtcdError as exc:
            if not exc.compacted:
                if exc.future_revision:
                    return  # watching from a future revision is fine
                raise
        else:
            return
        # The watch stream says where history starts now (canceled + compact_revision).
        try:
            with trio.fail_after(self.request_timeout):
                await watcher.connect()
                async for _ in watcher:
                    pass
        except Compacted:
            raise
        except (trio.TooSlowError, StoreError):
            pass
        raise Compacted(revision, 0)

    async def aclose(self) -> None:
        """See `ClusterStore.aclose`."""
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self._client.aclose()


class _StreamEnded(Exception):
    """The watch stream ended or broke: reconnect from the next revision."""


class _Watcher:
    """A watch's iterator over one NDJSON ``/v3/watch`` stream, reconnected as needed."""

    def __init__(self, store: EtcdStore, key: str, end: str, start_revision: int) -> None:
        self._store = store
        self._key = key
        self._end = end
        self._next_rev = start_revision  # 0 until the first stream says what "now" is
        self._endpoint = ""
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._buffer: collections.deque[WatchEvent] = collections.deque()
        self._closed = False

    async def connect(self) -> None:
        """Open a stream on some endpoint from ``_next_rev``, with failover and backoff."""
        store = self._store
        deadline = trio.current_time() + store.request_timeout
        delay = 0.05
        last = "no answer"
        while True:
            for _ in range(len(store.endpoints)):
                endpoint = store._endpoint()
                try:
                    await self._open(endpoint)
                    return
                except (httpx.TransportError, _StreamEnded) as exc:
                    last = f"{endpoint}: {exc!r}"
                except _EtcdError as exc:
                    if not exc.unavailable:
                        raise
                    last = f"{endpoint}: {exc}"
                await self._close_stream()
                store._rotate(endpoint)
            if trio.current_time() + delay > deadline:
                raise StoreUnavailable(f"cannot open an etcd watch (last: {last})")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _open(self, endpoint: str) -> None:
        await self._close_stream()
        client = self._store._client
        body = {
            "create_request": {
                "key": self._key,
                "range_end": self._end,
                "start_revision": str(self._next_rev),
            }
        }
        timeout = httpx.Timeout(
            self._store.request_timeout, connect=self._store.connect_timeout, read=None
        )  # read=None: a watch may rightly stay silent for hours
        request = client.build_request("POST", f"{endpoint}/v3/watch", json=body, timeout=timeout)
        self._endpoint = endpoint
        self._response = await client.send(request, stream=True)
        if self._response.status_code != 200:
            await self._response.aread()
            error = _error_of(self._response.status_code, _parse_body(self._response))
            raise error or _StreamEnded(f"HTTP {self._response.status_code}")
        self._lines = self._response.aiter_lines()
        result = await self._message()
        if not result.get("created"):
            raise _StreamEnded(f"watch not created: {result}")
        if self._next_rev == 0:
            self._next_rev = _revision(result) + 1  # "now" = after the creation revision

    async def _message(self) -> JSON:
        """The next ``result`` of the stream; raises `_StreamEnded` to make us reconnect."""
        if self._lines is None:
            raise _StreamEnded("not connected")
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                raise _StreamEnded("the stream ended") from None
            if line.strip():
                break
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise _StreamEnded(f"bad watch message {line[:200]!r}") from exc
        error = _error_of(200, message)
        if error is not None:  # e.g. "etcdserver: no leader": try another member
            raise _StreamEnded(str(error))
        result: JSON = message.get("result", {})
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0))
            if compact:
                raise Compacted(self._next_rev, compact)
            raise StoreError(f"etcd canceled the watch: {result.get('cancel_reason', result)}")
        return result

    async def _close_stream(self) -> None:
        response, self._response, self._lines = self._response, None, None
        if response is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await response.aclose()

    def __aiter__(self) -> _Watcher:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._buffer:
            if self._closed:  # the watch's context has exited: do not reconnect
                raise StopAsyncIteration
            if self._lines is None:
                await self.connect()
            try:
                result = await self._message()
            except (_StreamEnded, httpx.TransportError):
                # Killed member, graceful shutdown, lost quorum, or a cancelled read that broke
                # the line iterator: resume from the next revision, elsewhere if need be.
                await self._close_stream()
                self._store._rotate(self._endpoint)
                await trio.sleep(0.05)  # no hot loop against a member that keeps hanging up
                continue
            for event in result.get("events") or []:
                kv = _kv(event.get("kv", {}))
                kind = EventKind.DELETE if event.get("type") == "DELETE" else EventKind.PUT
                self._buffer.append(WatchEvent(kind, kv, kv.mod_revision))
                self._next_rev = max(self._next_rev, kv.mod_revision + 1)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        self._closed = True
        await self._close_stream()

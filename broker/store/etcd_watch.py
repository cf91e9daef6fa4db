"""The etcd store's watches: one NDJSON ``/v3/watch`` stream each, reconnected as needed.

A watch stream sends ``created`` first, then events, and errors in-stream (``{"error": ...}``).
A compacted start revision gives ``canceled`` + ``compact_revision`` while the HTTP stream
stays open; the stream simply ends on a graceful etcd shutdown. Any end of stream is treated as
"reconnect (to the next endpoint) from the last revision + 1".
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator

import httpx
import trio

from .base import Compacted, EventKind, StoreError, WatchEvent
from .etcd_gateway import Backoff, EtcdError, Gateway, error_of, parse_body
from .etcd_json import JSON, kv_of, revision_of

__all__ = ["Watcher"]


class _StreamEnded(Exception):
    """The watch stream ended or broke: reconnect from the next revision."""


class Watcher:
    """A watch's iterator over one NDJSON ``/v3/watch`` stream, reconnected as needed.

    ``key`` and ``end`` are the base64 key range (`etcd_json.key_range`).
    """

    def __init__(self, gateway: Gateway, key: str, end: str, start_revision: int) -> None:
        self._gateway = gateway
        self._key = key
        self._end = end
        self._next_rev = start_revision  # 0 until the first stream says what "now" is
        self._endpoint = ""
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._buffer: collections.deque[WatchEvent] = collections.deque()
        self._closed = False

    async def check_compacted(self) -> None:
        """Raise `Compacted` now if the start revision is compacted (etcd would tell the watch
        only a while after creating it)."""
        revision = self._next_rev
        body = {"key": self._key, "range_end": self._end, "revision": str(revision), "limit": "1"}
        try:
            await self._gateway.call("kv/range", body, retry_safe=True)
        except EtcdError as exc:
            if not exc.compacted:
                if exc.future_revision:
                    return  # watching from a future revision is fine
                raise
        else:
            return
        # The watch stream says where history starts now (canceled + compact_revision).
        try:
            with trio.fail_after(self._gateway.request_timeout):
                await self.connect()
                async for _ in self:
                    pass
        except Compacted:
            raise
        except (trio.TooSlowError, StoreError):
            pass
        raise Compacted(revision, 0)

    async def connect(self) -> None:
        """Open a stream on some endpoint from ``_next_rev``, with failover and backoff."""
        gateway = self._gateway
        backoff = Backoff(gateway.request_timeout)
        while True:
            for _ in range(len(gateway.endpoints)):
                endpoint = gateway.endpoint()
                try:
                    await self._open(endpoint)
                    return
                except (httpx.TransportError, _StreamEnded) as exc:
                    backoff.last = f"{endpoint}: {exc!r}"
                except EtcdError as exc:
                    if not exc.unavailable:
                        raise
                    backoff.last = f"{endpoint}: {exc}"
                await self._close_stream()
                gateway.rotate(endpoint)
            await backoff.pause("cannot open an etcd watch")

    async def _open(self, endpoint: str) -> None:
        await self._close_stream()
        gateway = self._gateway
        body = {
            "create_request": {
                "key": self._key,
                "range_end": self._end,
                "start_revision": str(self._next_rev),
            }
        }
        timeout = httpx.Timeout(
            gateway.request_timeout, connect=gateway.connect_timeout, read=None
        )  # read=None: a watch may rightly stay silent for hours
        request = gateway.client.build_request(
            "POST", f"{endpoint}/v3/watch", json=body, timeout=timeout
        )
        self._endpoint = endpoint
        self._response = await gateway.client.send(request, stream=True)
        if self._response.status_code != 200:
            await self._response.aread()
            error = error_of(self._response.status_code, parse_body(self._response))
            raise error or _StreamEnded(f"HTTP {self._response.status_code}")
        self._lines = self._response.aiter_lines()
        result = await self._message()
        if not result.get("created"):
            raise _StreamEnded(f"watch not created: {result}")
        if self._next_rev == 0:
            self._next_rev = revision_of(result) + 1  # "now" = after the creation revision

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
        error = error_of(200, message)
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

    def __aiter__(self) -> Watcher:
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
                self._gateway.rotate(self._endpoint)
                await trio.sleep(0.05)  # no hot loop against a member that keeps hanging up
                continue
            for event in result.get("events") or []:
                kv = kv_of(event.get("kv", {}))
                kind = EventKind.DELETE if event.get("type") == "DELETE" else EventKind.PUT
                self._buffer.append(WatchEvent(kind, kv, kv.mod_revision))
                self._next_rev = max(self._next_rev, kv.mod_revision + 1)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """End the iteration and close the stream."""
        self._closed = True
        await self._close_stream()

"""The etcd store's transport: POSTs to the members' JSON gateways, with failover.

Every request carries ``Grpc-Metadata-hasleader: true``, without which a watch on a member that
lost quorum hangs silently forever (with it, the member answers "no leader").

Failover: requests go to the current endpoint; on a failure the client moves to the next
endpoint and retries, within ``request_timeout``. Reads, keepalives, revokes, lease grants and
blind puts/deletes are retried on any transport error, "unavailable" answer or slow attempt
(repeating them leaves the same state; a put may then show up as two revisions). A txn is
retried only when it surely did not reach etcd (connection refused, no leader), because a
repeated CAS could report failure for a write that succeeded: when its outcome is unknown it
raises `StoreUnavailable` saying so.

Errors come in two shapes: unary answers carry ``{"error", "message", "code"}`` with an HTTP
status, a watch stream carries ``{"error": {"grpc_code", "http_code", "message"}}`` in-stream.
Both become an `EtcdError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import httpx
import trio

from .base import StoreError, StoreUnavailable
from .etcd_json import JSON

__all__ = ["Backoff", "EtcdError", "Gateway", "error_of", "parse_body"]

# gRPC status codes etcd puts in its error bodies.
_NOT_FOUND: Final = 5
_OUT_OF_RANGE: Final = 11
_UNAVAILABLE: Final = 14
_DEADLINE_EXCEEDED: Final = 4

# Connection never established: safe to retry anything on another endpoint.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class EtcdError(StoreError):
    """An error answer from etcd (HTTP status, gRPC code, message)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"etcd: {message} (HTTP {status}, code {code})")
        self.status = status
        self.code = code
        self.message = message

    @property
    def unavailable(self) -> bool:
        """The member cannot serve this now: another one may."""
        return self.status == 503 or self.code in {_UNAVAILABLE, _DEADLINE_EXCEEDED}

    @property
    def no_leader(self) -> bool:
        """The member has lost quorum: the request was surely not applied."""
        return "no leader" in self.message

    @property
    def compacted(self) -> bool:
        """The requested revision has been compacted."""
        return self.code == _OUT_OF_RANGE and "compacted" in self.message

    @property
    def future_revision(self) -> bool:
        """The requested revision is beyond the current one."""
        return self.code == _OUT_OF_RANGE and "future revision" in self.message

    @property
    def lease_not_found(self) -> bool:
        """The lease named does not exist (any more)."""
        return self.code == _NOT_FOUND and "lease not found" in self.message


def parse_body(response: httpx.Response) -> JSON:
    """The JSON object an answer carries; raises `EtcdError` for anything else."""
    text = response.text.strip()
    try:
        data = json.loads(text)
    except ValueError:
        # Streaming endpoints (lease keepalive) answer NDJSON: take the first line.
        try:
            data = json.loads(text.splitlines()[0]) if text else {}
        except ValueError:
            raise EtcdError(response.status_code, 0, text[:200] or "empty answer") from None
    if not isinstance(data, dict):
        raise EtcdError(response.status_code, 0, f"unexpected answer {text[:200]}")
    return data


def error_of(status: int, data: JSON) -> EtcdError | None:
    """The error carried by an answer (unary or in-stream shape), if any."""
    error = data.get("error")
    if isinstance(error, dict):  # in-stream shape: {"error": {"grpc_code", "http_code", ...}}
        return EtcdError(
            int(error.get("http_code", status)),
            int(error.get("grpc_code", 0)),
            str(error.get("message", error)),
        )
    if status != 200 or error is not None:
        message = data.get("message") or error or f"HTTP {status}"
        return EtcdError(status, int(data.get("code", 0)), str(message))
    return None


class Backoff:
    """The pauses between rounds over the endpoints: 50 ms, doubling up to 0.5 s, until a
    deadline ``timeout`` seconds from now."""

    def __init__(self, timeout: float) -> None:
        self.deadline = trio.current_time() + timeout
        self._delay = 0.05
        self.last = "no answer"
        """What went wrong last, for the error when giving up."""

    async def pause(self, giving_up: str) -> None:
        """Sleep before the next round, or raise `StoreUnavailable` (``giving_up`` and the last
        failure) if the deadline would pass first."""
        if trio.current_time() + self._delay > self.deadline:
            raise StoreUnavailable(f"{giving_up} (last: {self.last})")
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, 0.5)


class Gateway:
    """The members' JSON gateways, one of them current; see `EtcdStore` for the parameters."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout: float,
        connect_timeout: float,
        attempt_timeout: float,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e if "://" in e else f"http://{e}" for e in endpoints]
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.attempt_timeout = attempt_timeout
        self._current = 0
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            # The hasleader header makes a member without quorum answer "no leader" instead
            # of hanging. trust_env=False: a proxy from the environment must not sit between
            # the broker and its store.
            headers={"Grpc-Metadata-hasleader": "true"},
            trust_env=False,
        )
        self._closed = False

    def endpoint(self) -> str:
        """The endpoint to try now."""
        return self.endpoints[self._current]

    def rotate(self, failed: str) -> None:
        """Move on from a failed endpoint (unless a concurrent failure already did)."""
        if self.endpoints[self._current] == failed:
            self._current = (self._current + 1) % len(self.endpoints)

    async def call(self, path: str, body: JSON, *, retry_safe: bool) -> JSON:
        """POST ``/v3/<path>`` with failover; returns the answer or raises `EtcdError`.

        ``retry_safe``: repeating the request cannot change its meaning (reads, keepalive,
        revoke, and blind puts/deletes whose repetition leaves the same state), so any
        transport error, "unavailable" answer or slow attempt (``attempt_timeout``) moves on to
        the next endpoint. Otherwise (txn) only a request that surely never reached etcd is
        retried; an unknown outcome raises `StoreUnavailable`.
        """
        if self._closed:
            raise StoreError("the store is closed")
        backoff = Backoff(self.request_timeout)
        while True:
            for _ in range(len(self.endpoints)):
                remaining = backoff.deadline - trio.current_time()
                if remaining <= 0:
                    break
                endpoint = self.endpoint()
                attempt = min(remaining, self.attempt_timeout) if retry_safe else remaining
                timeout = httpx.Timeout(attempt, connect=min(attempt, self.connect_timeout))
                try:
                    response = await self.client.post(
                        f"{endpoint}/v3/{path}", json=body, timeout=timeout
                    )
                except _NOT_SENT as exc:
                    backoff.last = f"{endpoint}: {exc!r}"
                    self.rotate(endpoint)
                    continue
                except httpx.TransportError as exc:
                    if not retry_safe:
                        raise StoreUnavailable(
                            f"etcd {endpoint}: {exc!r} during {path}: it may or may not have "
                            "been applied"
                        ) from exc
                    backoff.last = f"{endpoint}: {exc!r}"
                    self.rotate(endpoint)
                    continue
                data = parse_body(response)
                error = error_of(response.status_code, data)
                if error is None:
                    return data
                if error.unavailable and (retry_safe or error.no_leader):
                    backoff.last = f"{endpoint}: {error}"
                    self.rotate(endpoint)
                    continue
                if error.unavailable:
                    raise StoreUnavailable(
                        f"{error} during {path}: it may or may not have been applied"
                    ) from error
                raise error
            await backoff.pause(f"no etcd endpoint answered {path} within {self.request_timeout} s")

    async def aclose(self) -> None:
        """Close the connections; every later `call` raises `StoreError`."""
        if not self._closed:
            self._closed = True
            with trio.CancelScope(shield=True):
                await self.client.aclose()

"""The primary's side of one connection to a recovery server (stand-alone or cluster node).

Thin and typed: connect over mutual TLS and negotiate; create or open a relationship;
send an IR from image files (resuming where the recovery server says); send a delta
batch from ``(disk, offset, data, digest)`` chunks; ask for digest maps; end a relationship
and remove its replica (:meth:`RecoveryClient.delete_relationship`); ask a clustering
broker where a VM's replica lives (:meth:`RecoveryClient.query`). Refusals come
back as frproto exceptions (``VMNotHere``, ``NotAuthorized``, ``OutOfSequence``...).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import socket
import ssl
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frlink.config import NO_COMPRESSION
from frlink.tls import BioTLSStream, tls_connect
from frproto.trio_io import FramedStream, keep_alive

from .bandwidth import BandwidthLimiter
from .disks import DiskResized
from .image_view import ImageView, view_of

log = logging.getLogger("frrep.primary")

#: How long a close waits to send TLS's close_notify before it closes the socket anyway.
CLOSE_SECONDS = 1.0
#: A Keepalive goes out whenever nothing was sent for this long on a negotiated connection
#: (TIM-8: the protocol's K, 30 s): a recovery side's idle deadline is at least 2K.
KEEPALIVE_SECONDS = float(fp.limits.KEEPALIVE_INTERVAL)
#: How long the primary waits for the next byte from the recovery side (between frames
#: or inside one) before it gives the connection up as dead (``frproto.trio_io.PeerIdle``, a
#: ``trio.TooSlowError``: the cycle fails as unreachable and is retried). The primary
#: reads only while it awaits an answer, and the recovery side sends a Keepalive every K
#: seconds meanwhile (TIM-9), so only a connection gone silent reaches this: a NAT or a
#: firewall that forgot the flow, a middlebox that stalled. Without it the primary waited
#: for the Ack forever (TCP gives up after many minutes, or never while something on the
#: way keeps acknowledging). The send side has the same bound: the kernel gives the
#: connection up when what it sends cannot go for this long (TCP_USER_TIMEOUT). Read when
#: each connection is made (TIM-13).
ANSWER_TIMEOUT = 4 * KEEPALIVE_SECONDS
#: Bytes read per IR step, sent as one chunk unless a piece of it is all zeros: large
#: frames keep the per-frame cost small (the server spent ~0.3 CPU s/GB more on 1 MiB
#: chunks than on 4 MiB ones, issue 16), and the protocol allows 4 MiB
#: (``frproto.limits.MAX_CHUNK_DATA``).
IR_CHUNK = 4 * 1024 * 1024
#: An all-zero piece of this size travels alone, as a zero chunk (a flag, no payload).
IR_ZERO_PIECE = 1024 * 1024
_ZERO_PIECE = bytes(IR_ZERO_PIECE)
#: One chunk of a delta batch: (disk index, offset, data, XXH3-128 digest of data).
BatchChunk = tuple[int, int, bytes | bytearray | memoryview, bytes]


#: TCP_NOTSENT_LOWAT for the primary's (bulk-sending) socket. trio sets 16 KiB on every
#: SocketStream, which wakes the sender for every few TLS records; perf-baselines measured
#: trio TCP at 3.66 GB/s with it and 5.21 GB/s with it raised.
SEND_LOWAT = 1024 * 1024


def ir_pieces(data: memoryview, join: int = IR_CHUNK) -> Iterator[tuple[int, int]]:
    """The chunks of one IR read, as ``(start, end)`` within ``data``: each all-zero
    :data:`IR_ZERO_PIECE` on its own (it travels as a flag), the bytes between joined
    into chunks of at most ``join`` bytes (a multiple of the piece)."""
    start = 0
    for lo in range(0, len(data), IR_ZERO_PIECE):
        hi = min(lo + IR_ZERO_PIECE, len(data))
        if _ZERO_PIECE.startswith(data[lo:hi]):  # memcmp; the piece is all zeros
            if start < lo:
                yield start, lo
            yield lo, hi
            start = hi
        elif hi - start >= join:
            yield start, hi
            start = hi
    if start < len(data):
        yield start, len(data)


def _raise_notsent_lowat(stream: BioTLSStream[Any]) -> None:
    """Performance only: raise TCP_NOTSENT_LOWAT on the connection's socket (if any)."""
    transport = stream.transport_stream
    if isinstance(transport, trio.SocketStream) and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SEND_LOWAT)


def _bound_unacknowledged(stream: BioTLSStream[Any], seconds: float) -> None:
    """Have the kernel give the connection up (ETIMEDOUT) when what it sent stays
    unacknowledged, or what it holds to send cannot go (the peer's window stays shut), for
    ``seconds``: the send side of :data:`ANSWER_TIMEOUT`. A send into a connection gone
    silent otherwise blocks until TCP's own retries end (many minutes), or for good while
    something on the way keeps acknowledging. Linux only (TCP_USER_TIMEOUT)."""
    transport = stream.transport_stream
    if isinstance(transport, trio.SocketStream) and hasattr(socket, "TCP_USER_TIMEOUT"):
        with contextlib.suppress(OSError):
            milliseconds = max(1, int(seconds * 1000))
            transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)


class _ViewReader:
    """The two calls of a file the IR makes, served by an :class:`ImageView`."""

    def __init__(self, view: ImageView) -> None:
        self._view, self._at = view, 0

    def seek(self, offset: int) -> None:
        self._at = offset

    def readinto(self, into: memoryview) -> int:
        data = self._view.pread(len(into), self._at)
        into[: len(data)] = data
        self._at += len(data)
        return len(data)


def _ir_reader(path: Path) -> contextlib.AbstractContextManager[Any]:
    """The IR's reader of one image: its view if one is installed, else the file."""
    view = view_of(path)
    if view is not None:
        return contextlib.nullcontext(_ViewReader(view))
    return path.open("rb", buffering=0)


@dataclass(frozen=True, slots=True)
class IRProgress:
    """Where an IR stands, for progress reporting."""

    bytes_done: int
    bytes_total: int


class RecoveryClient:
    """A negotiated connection from a primary to a recovery server."""

    def __init__(self, conn: FramedStream, negotiated: fp.NegotiateResponse) -> None:
        self.conn = conn
        self.negotiated = negotiated
        #: The VM a FailoverAsk named in answer to this connection's last open (protocol
        #: 1.1: a planned failover asked at the recovery side), if any.
        self.failover_asked: uuid.UUID | None = None
        self._keepalive = trio.CancelScope()

    def _keep_alive(self, interval: float) -> None:
        """Send a Keepalive whenever nothing was sent for ``interval`` seconds, until
        :meth:`aclose` (TIM-8): while this side reads a disk, waits on its bandwidth
        limit or computes digests, the recovery side sees it is alive. A task of its own
        (a system task: the connection outlives the caller's scopes), ended by aclose."""
        scope = self._keepalive

        async def run() -> None:
            with scope:
                try:
                    await keep_alive(self.conn, interval)
                except Exception:  # never let the pinger take the process down
                    log.exception("keepalive sender failed")

        trio.lowlevel.spawn_system_task(run, name="frrep keepalive")

    @property
    def is_broker(self) -> bool:
        """True when the far side said it is a clustering broker."""
        return self.negotiated.recovery_type is fp.RecoveryType.CLUSTERING_BROKER

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        server_name: str,
        ssl_context: ssl.SSLContext,
        local_address: str | None = None,
        compression: fp.CompressionSet = NO_COMPRESSION,
        timeout: float = 15.0,
        version: tuple[int, int] = fp.limits.PROTOCOL_VERSION,
    ) -> RecoveryClient:
        """Connect, handshake and negotiate (at ``version``: tests stand for an older
        primary with it).

        Raises:
            frlink.tls.TLSFailure, OSError: the server could not be reached or trusted.
            frproto.FrprotoError: the negotiation was refused (e.g. NotAuthorized).
        """
        stream = await tls_connect(
            host,
            port,
            ssl_context,
            server_name=server_name,
            local_address=local_address,
            timeout=timeout,
        )
        _raise_notsent_lowat(stream)
        answer_timeout = ANSWER_TIMEOUT
        _bound_unacknowledged(stream, answer_timeout)
        conn = FramedStream(
            stream,
            fp.Connection(fp.Role.PRIMARY),
            idle_timeout=lambda _state: answer_timeout,
            frame_timeout=answer_timeout,
        )
        try:
            with trio.fail_after(timeout):
                await conn.send(fp.NegotiateRequest(version, compression=compression))
                # In TLS 1.3 a refused client certificate shows up here, at the first read.
                answer = await conn.expect(fp.NegotiateResponse)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        assert isinstance(answer, fp.NegotiateResponse)
        if not answer.ok:
            await trio.aclose_forcefully(stream)
            raise fp.codec.error_class_for(answer.status)(
                f"{server_name} refused the negotiation: status {answer.status}, "
                f"verdict {answer.verdict.name}"
            )
        client = cls(conn, answer)
        client._keep_alive(KEEPALIVE_SECONDS)
        return client

    async def aclose(self) -> None:
        """Close the connection, saying so in TLS (``close_notify``) so that the server
        sees an orderly end rather than a truncation; within :data:`CLOSE_SECONDS`."""
        self._keepalive.cancel()
        with trio.move_on_after(CLOSE_SECONDS):
            await self.conn.stream.aclose()
        await trio.aclose_forcefully(self.conn.stream)  # a no-op unless that timed out

    @property
    def peer_address(self) -> str | None:
        """The IP address this connection reached (None if not a socket)."""
        stream = self.conn.stream
        transport = getattr(stream, "transport_stream", None)
        if isinstance(transport, trio.SocketStream):
            with contextlib.suppress(OSError):
                return str(transport.socket.getpeername()[0])
        return None

    async def query(
        self, vmid: uuid.UUID, *, name: str, disk_sizes: tuple[int, ...]
    ) -> fp.QueryRecoveryServerResponse:
        """Ask a clustering broker which recovery node holds (or will hold) the VM.

        Only on a connection that negotiated ``CLUSTERING_BROKER`` (frproto refuses it
        otherwise). A refusal by the broker raises its frproto exception.
        """
        await self.conn.send(fp.QueryRecoveryServer(vmid, name, disk_sizes))
        answer = await self.conn.expect(fp.QueryRecoveryServerResponse)
        assert isinstance(answer, fp.QueryRecoveryServerResponse)
        return answer

    async def open(
        self,
        vmid: uuid.UUID,
        *,
        name: str,
        disks: tuple[fp.DiskInfo, ...],
        config: bytes = b"",
        create: bool = True,
        generation: int = 0,
    ) -> fp.RelationshipAccepted:
        """Create (or re-create idempotently) or open the VM's relationship."""
        if create:
            await self.conn.send(fp.RelationshipCreate(vmid, name, disks, config))
        else:
            await self.conn.send(fp.RelationshipOpen(vmid, generation))
        self.failover_asked = None
        accepted = await self.conn.expect(fp.RelationshipAccepted, fp.FailoverAsk)
        if isinstance(accepted, fp.FailoverAsk):
            # Just before RelationshipAccepted (FOV-12): answered in the session, by a
            # FailoverRequest or a FailoverDecline (node/primary/failover_ask.py).
            self.failover_asked = accepted.vmid
            accepted = await self.conn.expect(fp.RelationshipAccepted)
        assert isinstance(accepted, fp.RelationshipAccepted)
        return accepted

    async def send_ir(
        self,
        vmid: uuid.UUID,
        images: Sequence[Path],
        *,
        sequence: int = 0,
        start: tuple[int, int] = (0, 0),
        on_block: Callable[[int, int, memoryview], None] | None = None,
        on_progress: Callable[[IRProgress], None] | None = None,
        limiter: BandwidthLimiter | None = None,
    ) -> None:
        """Send the images from ``start`` (disk index, offset) to the end, then IREnd.

        ``on_block(disk, offset, data)`` sees every chunk sent (to build the digest map).
        The images must not change while this runs (a paused VM or a snapshot).
        """
        sizes = [d.size for d in self.conn.connection.disks]
        total = sum(sizes)
        done = sum(sizes[: start[0]]) + start[1]
        await self.conn.send(
            fp.IRBegin(vmid, sequence, start[0], start[1], total_bytes=total - done)
        )
        # A mapping of its own, unmapped when the IR ends: a freed 4 MiB bytearray stays in
        # the allocator's arenas (a primary with 16 IRs at once kept ~100 MiB so).
        buffer = mmap.mmap(-1, IR_CHUNK, flags=mmap.MAP_PRIVATE)
        view = memoryview(buffer)
        data: memoryview | None = None
        try:
            for disk_index, path in enumerate(images):
                if disk_index < start[0]:
                    continue
                offset = start[1] if disk_index == start[0] else 0
                # A hypervisor's point in time (node/primary/image_view.py) or the file.
                with _ir_reader(path) as image:
                    image.seek(offset)
                    while offset < sizes[disk_index]:
                        want = min(IR_CHUNK, sizes[disk_index] - offset)
                        got = image.readinto(view[:want])
                        if got != want:
                            raise DiskResized(
                                f"{path} ends at {offset + got}, before its disk's "
                                f"{sizes[disk_index]} bytes: it shrank during the IR"
                            )
                        data = view[:want]
                        if on_block is not None:
                            on_block(disk_index, offset, data)
                        # A limited link gets 1 MiB chunks: a steady rate and visible progress
                        # matter there, not the CPU per chunk.
                        join = IR_ZERO_PIECE if limiter is not None else IR_CHUNK
                        for lo, hi in ir_pieces(data, join):
                            if limiter is not None:
                                await trio.sleep(limiter.reserve(hi - lo))
                            await self.conn.send_chunk(disk_index, offset + lo, data[lo:hi])
                            done += hi - lo
                            if on_progress is not None:
                                on_progress(IRProgress(done, total))
                        offset += want
        finally:
            data = None  # the last slice, so that the mapping can close now
            view.release()
            with contextlib.suppress(BufferError):  # a view still held: the collector unmaps
                buffer.close()
        await self.conn.end_ir()
        await self.conn.expect(fp.Ack)

    async def send_batch(
        self,
        vmid: uuid.UUID,
        sequence: int,
        chunks: Iterable[BatchChunk],
        *,
        chunk_count: int,
        total_bytes: int,
        captured_at_ms: int,
        limiter: BandwidthLimiter | None = None,
    ) -> None:
        """Send one delta batch and wait until the recovery server has applied it."""
        await self.conn.send(
            fp.BatchBegin(vmid, sequence, sequence - 1, chunk_count, total_bytes, captured_at_ms)
        )
        if limiter is None:
            await self.conn.send_chunks(chunks)
        else:
            for disk_index, offset, data, digest in chunks:
                # per chunk, so the link sees a steady rate
                await trio.sleep(limiter.reserve(len(data)))
                await self.conn.send_chunk(disk_index, offset, data, digest=digest)
        await self.conn.end_batch()
        ack = await self.conn.expect(fp.Ack)
        assert isinstance(ack, fp.Ack)

    async def digest_map(
        self, vmid: uuid.UUID, disk_index: int, block_size: int, offset: int, count: int
    ) -> fp.DigestMap:
        """The recovery server's block digests for a range of a disk."""
        await self.conn.send(fp.DigestMapRequest(vmid, disk_index, block_size, offset, count))
        answer = await self.conn.expect(fp.DigestMap)
        assert isinstance(answer, fp.DigestMap)
        return answer

    async def delete_relationship(self, vmid: uuid.UUID) -> None:
        """End the open relationship of ``vmid`` and have the recovery server remove its
        replica (images, journal, recovery points).

        Only with that relationship open (after :meth:`open`). On return the replica is
        gone and no relationship is open on this connection (another may be opened; a
        cluster node's broker has forgotten the VM). A refusal raises its frproto
        exception and leaves the relationship open.
        """
        await self.conn.send(fp.RelationshipDelete(vmid))
        await self.conn.expect(fp.Ack)

    async def decline_failover(self, vmid: uuid.UUID, reason: str) -> None:
        """Answer the FailoverAsk of the open relationship: this primary will not carry
        the planned failover out, for ``reason`` (cut to the 1024 bytes allowed, FOV-17).
        The relationship stays open (FOV-15)."""
        text = reason.encode()[: fp.limits.MAX_ERROR_TEXT].decode(errors="ignore")
        await self.conn.send(fp.FailoverDecline(vmid, text))
        self.failover_asked = None

    async def fail_over(self, request: fp.FailoverRequest) -> fp.FailoverDone:
        """Ask the recovery side to take the open relationship's VM over at the final
        state ``request`` describes (protocol 1.1, FOV-2); its answer. A refusal raises
        its frproto exception and leaves the relationship open, nothing changed.

        Raises:
            frproto.NotSupported: the recovery side speaks protocol 1.0 only (NEG-13).
        """
        if self.negotiated.version < (1, 1):
            raise fp.NotSupported(
                "the recovery side speaks protocol 1.0: a planned failover in one step needs "
                "1.1 (take the VM over there with 'frctl failover unplanned --point SEQ')"
            )
        await self.conn.send(request)
        done = await self.conn.expect(fp.FailoverDone)
        assert isinstance(done, fp.FailoverDone)
        return done

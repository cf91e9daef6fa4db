"""A primary/recovery Connection pair wired back to back (like h11's ConnectionPair).

Every message sent through the pair is checked on the way: the receiver gets exactly one
event, equal to what was sent, and both ends agree on the state afterwards. Bytes can be
fed in random-size pieces (pass an ``rng``).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence

import frproto as fp
from frproto import Connection, Role, State

DEFAULT_VMID = uuid.UUID("6f1b7c1e-3a52-4c8e-9d0a-2f4b1e7c9a10")
DEFAULT_DISKS = (fp.DiskInfo("disk0", 1 << 20), fp.DiskInfo("disk1", 3 * 4096 + 17))


def split(data: bytes, rng: random.Random | None) -> list[bytes]:
    """``data`` in random-size pieces (the whole when ``rng`` is None)."""
    if rng is None or len(data) <= 1:
        return [data]
    pieces: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 7, 8, 9, 40, rng.randint(1, len(data))))
        pieces.append(data[pos : pos + size])
        pos += size
    return pieces


def drain(conn: Connection) -> list[fp.Event]:
    """Every event ``conn`` can produce from what it has (up to NEED_DATA or the close)."""
    events: list[fp.Event] = []
    while True:
        event = conn.next_event()
        if event is fp.NEED_DATA:
            return events
        assert not isinstance(event, fp.NeedData)
        events.append(event)
        if isinstance(event, fp.ConnectionClosed):
            return events


def send_any(conn: Connection, message: fp.Message) -> list[bytes | bytearray | memoryview]:
    """Send ``message`` from ``conn``: a Chunk through ``send_chunk``, the rest through ``send``."""
    if isinstance(message, fp.Chunk):
        data = bytes(message.length) if message.is_zero else message.data
        return conn.send_chunk(message.disk_index, message.offset, data, digest=message.digest)
    return [conn.send(message)]


def state_of(obj: Connection | ConnectionPair) -> State:
    """``obj.state``, read through a call so that type checkers do not narrow it."""
    return obj.state


class ConnectionPair:
    """A primary and a recovery Connection that talk through :meth:`send`."""

    def __init__(
        self, rng: random.Random | None = None, config: fp.ConnectionConfig | None = None
    ) -> None:
        self.primary = Connection(Role.PRIMARY, config)
        self.recovery = Connection(Role.RECOVERY, config)
        self.rng = rng

    def conn(self, role: Role) -> Connection:
        return self.primary if role is Role.PRIMARY else self.recovery

    def peer(self, role: Role) -> Connection:
        return self.recovery if role is Role.PRIMARY else self.primary

    @property
    def state(self) -> State:
        """The shared state (asserting that both ends agree)."""
        assert self.primary.state is self.recovery.state, (self.primary.state, self.recovery.state)
        return self.primary.state

    def deliver(
        self, receiver: Connection, pieces: Sequence[bytes | bytearray | memoryview]
    ) -> list[fp.Event]:
        """Feed ``pieces`` (re-split when an rng is set) and collect the events."""
        events: list[fp.Event] = []
        for piece in pieces:
            parts: Sequence[bytes | bytearray | memoryview] = (
                split(bytes(piece), self.rng) if self.rng else [piece]
            )
            for part in parts:
                receiver.receive_data(part)
                events.extend(drain(receiver))
        return events

    def send(self, role: Role, message: fp.Message) -> fp.Event:
        """``message`` from ``role`` to its peer; returns the peer's (equal) event."""
        data = self.conn(role).send(message)
        events = self.deliver(self.peer(role), [data])
        assert events == [message], (events, message)
        _ = self.state
        return events[0]

    def send_chunk(
        self,
        disk_index: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        digest: bytes | None = None,
        compress_data: bool = True,
    ) -> fp.Chunk:
        """A chunk from the primary, through ``send_chunk``; returns the received Chunk."""
        pieces = self.primary.send_chunk(
            disk_index, offset, data, digest=digest, compress_data=compress_data
        )
        events = self.deliver(self.recovery, pieces)
        assert len(events) == 1, events
        chunk = events[0]
        assert isinstance(chunk, fp.Chunk)
        assert (chunk.disk_index, chunk.offset, chunk.length) == (disk_index, offset, len(data))
        expected = b"" if chunk.is_zero else bytes(data)
        assert bytes(chunk.data) == expected
        if chunk.is_zero:
            assert not any(data)
        _ = self.state
        return chunk

    # -- walking to a state ------------------------------------------------------------------

    def negotiate(
        self,
        recovery_type: fp.RecoveryType = fp.RecoveryType.STANDALONE,
        compression: fp.Compression = fp.Compression.NONE,
    ) -> fp.NegotiateResponse:
        self.send(Role.PRIMARY, fp.NegotiateRequest())
        response = fp.NegotiateResponse(
            recovery_type=recovery_type, compression=compression, server_name="recovery.example"
        )
        self.send(Role.RECOVERY, response)
        assert state_of(self) is State.READY
        return response

    def open(
        self,
        vmid: uuid.UUID = DEFAULT_VMID,
        disks: tuple[fp.DiskInfo, ...] = DEFAULT_DISKS,
        *,
        create: bool = True,
    ) -> fp.RelationshipAccepted:
        request: fp.Message
        if create:
            request = fp.RelationshipCreate(vmid, "vm one", disks)
        else:
            request = fp.RelationshipOpen(vmid)
        self.send(Role.PRIMARY, request)
        accepted = fp.RelationshipAccepted(vmid, disks)
        self.send(Role.RECOVERY, accepted)
        assert state_of(self) is State.SESSION
        assert self.primary.vmid == self.recovery.vmid == vmid
        assert self.primary.disks == self.recovery.disks == disks
        return accepted

    def end_ir(self, sequence: int = 0) -> None:
        vmid = self.primary.vmid
        assert vmid is not None
        assert self.primary.aggregate_digest == self.recovery.aggregate_digest
        end = self.primary.end_ir()
        assert end == self.recovery.end_ir()
        assert end == fp.IREnd(
            vmid, sequence, self.primary.chunk_count, self.primary.aggregate_digest
        )
        self.send(Role.PRIMARY, end)

    def end_batch(self, sequence: int) -> None:
        vmid = self.primary.vmid
        assert vmid is not None
        assert self.primary.aggregate_digest == self.recovery.aggregate_digest
        end = self.primary.end_batch()
        assert end == self.recovery.end_batch()
        assert end == fp.BatchEnd(
            vmid, sequence, self.primary.chunk_count, self.primary.aggregate_digest
        )
        self.send(Role.PRIMARY, end)

    def walk_to(
        self,
        target: State,
        *,
        recovery_type: fp.RecoveryType = fp.RecoveryType.STANDALONE,
        compression: fp.Compression = fp.Compression.NONE,
        vmid: uuid.UUID = DEFAULT_VMID,
        disks: tuple[fp.DiskInfo, ...] = DEFAULT_DISKS,
        batch_chunks: int = 2,
    ) -> ConnectionPair:
        """Walk both ends from IDLE to ``target`` with legal messages; returns self.

        QUERYING needs a clustering broker, so it negotiates one whatever
        ``recovery_type`` says. MUST_CLOSE is reached by a fatal Error in READY.
        """
        assert state_of(self) is State.IDLE
        if target is State.IDLE:
            return self
        if target is State.NEGOTIATING:
            self.send(Role.PRIMARY, fp.NegotiateRequest())
            return self
        if target is State.QUERYING:
            recovery_type = fp.RecoveryType.CLUSTERING_BROKER
        self.negotiate(recovery_type, compression)
        if target is State.READY:
            return self
        if target is State.MUST_CLOSE:
            self.send(Role.PRIMARY, fp.Error(fp.ErrorCode.INTERNAL, "bye"))
            assert state_of(self) is State.MUST_CLOSE
            return self
        if target is State.QUERYING:
            self.send(Role.PRIMARY, fp.QueryRecoveryServer(vmid, "vm one", (1 << 30,)))
            assert state_of(self) is State.QUERYING
            return self
        if target is State.OPENING:
            self.send(Role.PRIMARY, fp.RelationshipOpen(vmid))
            assert state_of(self) is State.OPENING
            return self
        self.open(vmid, disks)
        if target is State.SESSION:
            return self
        if target in (State.IR, State.IR_ENDING):
            self.send(Role.PRIMARY, fp.IRBegin(vmid))
            self.send_chunk(0, 0, b"initial data" * 10)
            if target is State.IR_ENDING:
                self.end_ir()
        elif target in (State.BATCH, State.BATCH_ENDING):
            self.send(Role.PRIMARY, fp.BatchBegin(vmid, 1, 0, batch_chunks))
            if target is State.BATCH_ENDING:
                for i in range(batch_chunks):
                    self.send_chunk(0, 4096 * i, bytes([i + 1]) * 4096)
                self.end_batch(1)
        elif target is State.DIGESTS:
            self.send(Role.PRIMARY, fp.DigestMapRequest(vmid, 0, 4096, 0, 4))
        elif target is State.DELETING:
            self.send(Role.PRIMARY, fp.RelationshipDelete(vmid))
        elif target is State.FAILING_OVER:
            self.send(Role.PRIMARY, fp.FailoverRequest(vmid, 0, 4096, bytes(16)))
        else:
            raise ValueError(f"walk_to cannot reach {target}")
        assert state_of(self) is target, (self.state, target)
        return self

"""What a connection remembers about the open relationship, IR or batch.

The state table (``_state``) says which message may come next; this module checks that
the message fits what came before it: the VMID of the open relationship, chunk bounds
against the disks the recovery server reported, chunk counts and the aggregate digest of
an IR or batch, and the range of a digest map. It raises the ``RemoteProtocolError``
subclass that names the fault; the connection turns that into a ``LocalProtocolError``
when the message is our own.

Because both ends run these checks, a recovery server never sees (and so never writes)
a chunk outside a disk, or a batch whose chunks were not all received and verified.
"""

from __future__ import annotations

import uuid
from typing import TypeVar

from ._chunks import AggregateDigest
from ._enums import COMPRESSION_OFFER_BIT, ENCRYPTION_OFFER_BIT, AckKind, Compression
from ._errors import BadValue, ChunkOutOfRange, CountMismatch, DigestMismatch, UnexpectedMessage
from ._failover import FailoverAsk, FailoverDecline, FailoverDone, FailoverRequest
from ._messages import (
    DiskInfo,
    Error,
    Message,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    QueryRecoveryServerResponse,
)
from ._replication import (
    Ack,
    BatchBegin,
    BatchEnd,
    DigestMap,
    DigestMapRequest,
    IRBegin,
    IREnd,
    RelationshipAccepted,
    RelationshipCreate,
    RelationshipDelete,
    RelationshipOpen,
)
from .limits import MAX_DIGESTS

_End = TypeVar("_End", IREnd, BatchEnd)


class SessionTracker:
    """Relationship, transfer and digest-map bookkeeping for one connection."""

    __slots__ = (
        "_aggregate",
        "_asked",
        "_declared_chunks",
        "_deleting",
        "_digest_request",
        "_failover",
        "_offer",
        "_pending_vmid",
        "_query",
        "_sequence",
        "disks",
        "vmid",
    )

    def __init__(self) -> None:
        #: The VM whose relationship is open (after RelationshipAccepted).
        self.vmid: uuid.UUID | None = None
        #: Its disks, as the recovery server reported them.
        self.disks: tuple[DiskInfo, ...] = ()
        self._pending_vmid: uuid.UUID | None = None
        self._aggregate = AggregateDigest()
        self._declared_chunks: int | None = None
        self._sequence = 0
        self._digest_request: DigestMapRequest | None = None
        self._offer: NegotiateRequest | None = None
        self._query: QueryRecoveryServer | None = None
        #: A RelationshipDelete awaits its answer (the next Ack must be RELATIONSHIP_DELETED).
        self._deleting = False
        #: The FailoverRequest that awaits its answer (FAILING_OVER), if any.
        self._failover: FailoverRequest | None = None
        #: The VM a FailoverAsk named in the open relationship, until it is declined.
        self._asked: uuid.UUID | None = None

    @property
    def aggregate_digest(self) -> bytes:
        """Aggregate digest of the chunks of the current IR or batch so far."""
        return self._aggregate.digest()

    @property
    def chunk_count(self) -> int:
        """Chunks of the current IR or batch so far."""
        return self._aggregate.count

    def end(self, kind: type[_End]) -> _End:
        """The IREnd or BatchEnd for the chunks of the current IR or batch so far."""
        assert self.vmid is not None  # an IR or batch runs only in an open relationship
        return kind(self.vmid, self._sequence, self._aggregate.count, self._aggregate.digest())

    def _require_vm(self, vmid: uuid.UUID, what: str) -> None:
        if vmid != self.vmid:
            raise UnexpectedMessage(
                f"{what} for VM {vmid}, but the open relationship is {self.vmid}"
            )

    def check(self, message: Message) -> None:
        """Check ``message`` against what came before; raises without changing anything."""
        if isinstance(
            message,
            (
                IRBegin,
                BatchBegin,
                DigestMapRequest,
                RelationshipDelete,
                FailoverRequest,
                FailoverDecline,
            ),
        ):
            self._require_vm(message.vmid, type(message).__name__)
        if isinstance(message, IRBegin):
            if message.start_disk > len(self.disks) or (
                message.start_disk < len(self.disks)
                and message.start_offset > self.disks[message.start_disk].size
            ):
                raise ChunkOutOfRange("IRBegin resumes past the end of the disks")
        elif isinstance(message, NegotiateResponse):
            self._check_negotiated(message)
        elif isinstance(message, QueryRecoveryServerResponse):
            assert self._query is not None  # the state table allows it only after a query
            if message.vmid != self._query.vmid:
                raise UnexpectedMessage(
                    f"QueryRecoveryServerResponse for {message.vmid}, asked {self._query.vmid}"
                )
        elif isinstance(message, FailoverDecline):
            if self._asked != message.vmid:
                raise UnexpectedMessage(
                    f"FailoverDecline for {message.vmid}, which no FailoverAsk on this "
                    "connection asked (FOV-16)"
                )
        elif isinstance(message, FailoverAsk):
            if message.vmid != self._pending_vmid:
                raise UnexpectedMessage(
                    f"FailoverAsk for {message.vmid}, the relationship being opened is "
                    f"{self._pending_vmid} (FOV-13)"
                )
        elif isinstance(message, RelationshipAccepted):
            if message.vmid != self._pending_vmid:
                raise UnexpectedMessage(
                    f"RelationshipAccepted for {message.vmid}, requested {self._pending_vmid}"
                )
        elif isinstance(message, (IREnd, BatchEnd)):
            self._require_vm(message.vmid, type(message).__name__)
            if message.sequence != self._sequence:
                raise UnexpectedMessage(
                    f"{type(message).__name__} for sequence {message.sequence}, "
                    f"begun as {self._sequence}"
                )
            if message.chunk_count != self._aggregate.count:
                raise CountMismatch(
                    f"{type(message).__name__} says {message.chunk_count} chunks, "
                    f"{self._aggregate.count} were sent"
                )
            if self._declared_chunks is not None and message.chunk_count != self._declared_chunks:
                raise CountMismatch(
                    f"BatchEnd after {message.chunk_count} chunks, BatchBegin declared "
                    f"{self._declared_chunks}"
                )
            if message.aggregate_digest != self._aggregate.digest():
                raise DigestMismatch(f"{type(message).__name__}: aggregate digest mismatch")
        elif isinstance(message, Ack):
            self._require_vm(message.vmid, "Ack")
            if self._deleting:
                want, sequence = AckKind.RELATIONSHIP_DELETED, 0
            elif self._declared_chunks is not None:
                want, sequence = AckKind.BATCH_APPLIED, self._sequence
            else:
                want, sequence = AckKind.IR_COMPLETE, self._sequence
            if message.kind is not want or message.sequence != sequence:
                raise UnexpectedMessage(
                    f"Ack {message.kind.name} {message.sequence}, expected {want.name} {sequence}"
                )
        elif isinstance(message, DigestMapRequest):
            self._check_digest_request(message)
        elif isinstance(message, DigestMap):
            self._check_digest_map(message)
        elif isinstance(message, FailoverDone):
            asked = self._failover
            assert asked is not None  # the state table allows it only after a request
            if (message.vmid, message.sequence) != (asked.vmid, asked.sequence):
                raise UnexpectedMessage(
                    f"FailoverDone for {message.vmid} at {message.sequence}, asked for "
                    f"{asked.vmid} at {asked.sequence} (FOV-3)"
                )

    def accept_chunk(self, disk_index: int, offset: int, length: int, digest: bytes) -> None:
        """Check one chunk of the current IR or batch before it is used, then count it."""
        if disk_index >= len(self.disks):
            raise ChunkOutOfRange(f"chunk for disk {disk_index}; the VM has {len(self.disks)}")
        if offset + length > self.disks[disk_index].size:
            raise ChunkOutOfRange(
                f"chunk {offset}+{length} runs past the end of disk {disk_index} "
                f"({self.disks[disk_index].size} bytes)"
            )
        if self._declared_chunks is not None and self._aggregate.count >= self._declared_chunks:
            raise CountMismatch(f"more chunks than the {self._declared_chunks} declared")
        self._aggregate.add(digest)

    def apply(self, message: Message) -> None:
        """Record ``message`` (after it passed :meth:`check` and the state table)."""
        if isinstance(message, NegotiateRequest):
            self._offer = message
        elif isinstance(message, QueryRecoveryServer):
            self._query = message
        elif isinstance(message, (RelationshipCreate, RelationshipOpen)):
            self._pending_vmid = message.vmid
            self._asked = None
            self.vmid = None
            self.disks = ()
        elif isinstance(message, RelationshipAccepted):
            self.vmid = message.vmid
            self.disks = message.disks
        elif isinstance(message, IRBegin):
            self._start(message.sequence, None)
        elif isinstance(message, BatchBegin):
            self._start(message.sequence, message.chunk_count)
        elif isinstance(message, DigestMapRequest):
            self._digest_request = message
        elif isinstance(message, DigestMap):
            self._digest_request = None
        elif isinstance(message, RelationshipDelete):
            self._deleting = True
        elif isinstance(message, FailoverRequest):
            self._failover = message
        elif isinstance(message, FailoverAsk):
            self._asked = message.vmid
        elif isinstance(message, FailoverDecline):
            self._asked = None
        elif isinstance(message, FailoverDone):
            # The VM is failed over: this relationship is over, nothing is open.
            self._failover = None
            self._pending_vmid = None
            self.vmid = None
            self.disks = ()
        elif isinstance(message, Ack) and self._deleting:
            # The relationship is closed: as after a refused open, nothing is open.
            self._deleting = False
            self._pending_vmid = None
            self.vmid = None
            self.disks = ()
        elif isinstance(message, Error):
            # An Error in DELETING refuses the delete (the relationship stays open) or
            # ends the conversation: either way no delete is pending any more.
            self._deleting = False

    def _start(self, sequence: int, declared: int | None) -> None:
        self._aggregate = AggregateDigest()
        self._declared_chunks = declared
        self._sequence = sequence

    def _check_negotiated(self, answer: NegotiateResponse) -> None:
        """A compatible answer must choose only among what the primary offered."""
        offer = self._offer
        assert offer is not None  # the state table allows a response only after the request
        if not answer.ok:
            return
        if answer.version[0] != offer.version[0] or answer.version[1] > offer.version[1]:
            raise BadValue(
                f"version {answer.version} marked compatible with an offer of {offer.version}"
            )
        if answer.compression is not Compression.NONE and not (
            offer.compression & COMPRESSION_OFFER_BIT[answer.compression]
        ):
            raise BadValue(f"compression {answer.compression.name} was not offered")
        if not offer.encryption & ENCRYPTION_OFFER_BIT[answer.encryption]:
            raise BadValue(f"encryption {answer.encryption.name} was not offered")
        if answer.auth_type is not offer.auth_type:
            raise BadValue(f"auth type {answer.auth_type.name}, {offer.auth_type.name} asked")

    def _check_digest_request(self, request: DigestMapRequest) -> None:
        if request.disk_index >= len(self.disks):
            raise ChunkOutOfRange(f"digest map of disk {request.disk_index}; no such disk")
        if request.offset >= self.disks[request.disk_index].size:
            raise ChunkOutOfRange("digest map range starts past the end of the disk")

    def expected_blocks(self, request: DigestMapRequest) -> int:
        """How many digests answer ``request`` (the range is cut at the disk's end)."""
        left = self.disks[request.disk_index].size - request.offset
        return min(request.block_count, -(-left // request.block_size), MAX_DIGESTS)

    def _check_digest_map(self, answer: DigestMap) -> None:
        request = self._digest_request
        assert request is not None  # the state table only allows DigestMap after a request
        if (answer.vmid, answer.disk_index, answer.block_size, answer.offset) != (
            request.vmid,
            request.disk_index,
            request.block_size,
            request.offset,
        ):
            raise UnexpectedMessage("DigestMap does not answer the DigestMapRequest")
        if answer.block_count != self.expected_blocks(request):
            raise CountMismatch(
                f"DigestMap has {answer.block_count} digests, expected "
                f"{self.expected_blocks(request)}"
            )

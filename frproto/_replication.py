"""Messages of a replication session: relationship, IR, delta batches, chunks, digest maps.

The same conventions as ``_messages``: frozen, slotted, one field table per message (the
field annotations), one set of checks for building and decoding. :class:`Chunk` is the
exception: it is built once per chunk of bulk data on the hot path, so it is a plain
slotted class without a table, framed by ``_chunks`` and checked by the connection
(``_chunks``, ``_session``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeAlias

from construct import Int16ub, Int64ub, PrefixedArray, Struct

from ._enums import AckKind, ChunkFlags, IRState, MessageTag
from ._errors import BadValue
from ._fields import (
    NAME_ERRORS,
    U16,
    U32,
    U64,
    Blob,
    Digest,
    EnumOf,
    Spec,
    UInt,
    Vmid,
    prefixed,
)
from ._messages import DiskInfo, Message, VMName
from ._validate import check_disk_id
from ._wire import Bytes
from .limits import (
    DIGEST_SIZE,
    MAX_BLOCK_SIZE,
    MAX_CONFIG_BLOB,
    MAX_DIGESTS,
    MAX_DISKS,
    MIN_BLOCK_SIZE,
)


class _DiskList(Spec[tuple[DiskInfo, ...]]):
    """A VM's disks: at least one, at most MAX_DISKS, ids unique, sizes below 2**63."""

    con = PrefixedArray(Int16ub, Struct("disk_id" / prefixed(8), "size" / Int64ub))

    def to_wire(self, value: tuple[DiskInfo, ...]) -> Any:
        return [{"disk_id": d.disk_id.encode(), "size": d.size} for d in value]

    def from_wire(self, name: str, raw: Any) -> tuple[DiskInfo, ...]:
        return tuple(DiskInfo(bytes(d.disk_id).decode("utf-8", NAME_ERRORS), d.size) for d in raw)

    def check(self, name: str, value: tuple[DiskInfo, ...], fields: Mapping[str, Any]) -> None:
        for disk in value:  # every id first (docs/protocol.md: ENC-5 before ENC-7)
            check_disk_id(disk.disk_id.encode("utf-8", NAME_ERRORS))
        if not value:
            raise BadValue("a VM needs at least one disk")
        if len(value) > MAX_DISKS:
            raise BadValue(f"{len(value)} disks, the limit is {MAX_DISKS}")
        seen: set[str] = set()
        for disk in value:
            if disk.disk_id in seen:
                raise BadValue(f"disk id {disk.disk_id!r} appears twice")
            seen.add(disk.disk_id)
            if not 0 < disk.size < 1 << 63:
                raise BadValue(f"disk {disk.disk_id!r} size {disk.size} out of range")


class _ResumeDisk(Spec[int]):
    """Where an IR resumes: a disk index, at most the number of ``disks`` (all done)."""

    con = Int16ub

    def check(self, name: str, value: int, fields: Mapping[str, Any]) -> None:
        if not 0 <= value <= len(fields["disks"]):
            raise BadValue(f"resume_disk {value} past the last disk")


class _BaseSequence(UInt):
    """A batch's base sequence: a u64 below the batch's ``sequence``."""

    def __init__(self) -> None:
        super().__init__(64)

    def check(self, name: str, value: int, fields: Mapping[str, Any]) -> None:
        super().check(name, value, fields)
        if fields["sequence"] <= value:
            raise BadValue(f"sequence {fields['sequence']} not after base {value}")


def _check_config(config: bytes) -> None:
    if len(config) > MAX_CONFIG_BLOB:
        raise BadValue(f"config blob of {len(config)} bytes, limit {MAX_CONFIG_BLOB}")


#: A VM's disks: ids and sizes (RelationshipCreate, RelationshipAccepted).
Disks: TypeAlias = Annotated[tuple[DiskInfo, ...], _DiskList()]


@dataclass(frozen=True, slots=True)
class RelationshipCreate(Message):
    """Primary to recovery server: create the replica of a VM (before its IR)."""

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_CREATE
    WIRE_ORDER: ClassVar[tuple[str, ...]] = ("vmid", "vm_name", "config", "disks")
    vmid: Vmid
    vm_name: VMName
    disks: Disks
    config: Annotated[bytes, Blob(32, _check_config)] = b""


@dataclass(frozen=True, slots=True)
class RelationshipOpen(Message):
    """Primary to recovery server: carry on an existing relationship.

    ``generation`` is the relationship's generation as the primary knows it; a recovery
    server whose replica has moved to a newer generation (after a failover) refuses it.
    """

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_OPEN
    vmid: Vmid
    generation: U32 = 0


@dataclass(frozen=True, slots=True)
class RelationshipAccepted(Message):
    """Recovery server to primary: the relationship is open; here is where it stands."""

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_ACCEPTED
    WIRE_ORDER: ClassVar[tuple[str, ...]] = (
        "vmid",
        "generation",
        "ir_state",
        "applied_sequence",
        "resume_disk",
        "resume_offset",
        "disks",
    )
    CHECK_ORDER: ClassVar[tuple[str, ...]] = (
        "vmid",
        "disks",
        "resume_disk",
        "ir_state",
        "generation",
        "applied_sequence",
        "resume_offset",
    )
    vmid: Vmid
    disks: Disks
    generation: U32 = 0
    ir_state: Annotated[IRState, EnumOf(IRState)] = IRState.NOT_STARTED
    applied_sequence: U64 = 0
    resume_disk: Annotated[int, _ResumeDisk()] = 0
    resume_offset: U64 = 0


@dataclass(frozen=True, slots=True)
class RelationshipDelete(Message):
    """Primary to recovery server: end the open relationship and remove its replica.

    Only in an open relationship (SESSION), for that relationship's VM. The recovery
    server answers ``Ack(kind=RELATIONSHIP_DELETED, sequence=0)`` once the replica is gone,
    after which no relationship is open (READY), or refuses with an Error (back to
    SESSION, the relationship still open).
    """

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_DELETE
    vmid: Vmid


@dataclass(frozen=True, slots=True)
class IRBegin(Message):
    """Primary: initial replication starts (or resumes at ``start_disk``/``start_offset``).

    The IR establishes recovery point ``sequence``; delta batches continue after it.
    """

    TAG: ClassVar[MessageTag] = MessageTag.IR_BEGIN
    vmid: Vmid
    sequence: U64 = 0
    start_disk: U16 = 0
    start_offset: U64 = 0
    total_bytes: U64 = 0


@dataclass(frozen=True, slots=True)
class _TransferEnd(Message):
    """The end of an IR or a batch: its sequence, chunk count and aggregate digest."""

    vmid: Vmid
    sequence: U64
    chunk_count: U32
    aggregate_digest: Digest


@dataclass(frozen=True, slots=True)
class IREnd(_TransferEnd):
    """Primary: initial replication is complete; counts and digest of what was sent."""

    TAG: ClassVar[MessageTag] = MessageTag.IR_END


@dataclass(frozen=True, slots=True)
class BatchEnd(_TransferEnd):
    """Primary: the batch's last chunk was sent; counts and digest of the batch."""

    TAG: ClassVar[MessageTag] = MessageTag.BATCH_END


@dataclass(frozen=True, slots=True)
class BatchBegin(Message):
    """Primary: a delta batch (one replication cycle, all of the VM's disks) starts.

    ``sequence`` must be ``base_sequence + 1`` in ordinary replication; a recovery
    server refuses a batch whose base is not its applied sequence (OUT_OF_SEQUENCE).
    """

    TAG: ClassVar[MessageTag] = MessageTag.BATCH_BEGIN
    CHECK_ORDER: ClassVar[tuple[str, ...]] = (
        "sequence",
        "base_sequence",
        "vmid",
        "chunk_count",
        "total_bytes",
        "captured_at_ms",
    )
    vmid: Vmid
    sequence: U64
    base_sequence: Annotated[int, _BaseSequence()]
    chunk_count: U32
    total_bytes: U64 = 0
    captured_at_ms: U64 = 0


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Recovery server: the IR is complete, a batch is applied durably, or the replica
    is removed (after a RelationshipDelete; sequence 0)."""

    TAG: ClassVar[MessageTag] = MessageTag.ACK
    vmid: Vmid
    kind: Annotated[AckKind, EnumOf(AckKind)]
    sequence: U64


def _check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise BadValue(f"block size {block_size} outside {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}")


def _check_block_count(block_count: int) -> None:
    if not 0 < block_count <= MAX_DIGESTS:
        raise BadValue(f"block_count {block_count} outside 1-{MAX_DIGESTS}")


def _check_digest_blob(digests: bytes) -> None:
    size = len(digests)
    if size % DIGEST_SIZE:
        raise BadValue(f"digest map of {size} bytes is not a multiple of {DIGEST_SIZE}")
    if size // DIGEST_SIZE > MAX_DIGESTS:
        raise BadValue(f"digest map over {MAX_DIGESTS} digests")


BlockSize = Annotated[int, UInt(32, check=_check_block_size)]


@dataclass(frozen=True, slots=True)
class DigestMapRequest(Message):
    """Primary: send me the block digests of this range of a disk (resync, verify)."""

    TAG: ClassVar[MessageTag] = MessageTag.DIGEST_MAP_REQUEST
    vmid: Vmid
    disk_index: U16
    block_size: BlockSize
    offset: U64
    block_count: Annotated[int, UInt(32, check=_check_block_count)]


@dataclass(frozen=True, slots=True)
class DigestMap(Message):
    """Recovery server: the XXH3-128 digest of each block, concatenated in order.

    A block that runs past the end of the disk is digested over the bytes that exist.
    """

    TAG: ClassVar[MessageTag] = MessageTag.DIGEST_MAP
    vmid: Vmid
    disk_index: U16
    block_size: BlockSize
    offset: U64
    #: block_count * 16 bytes.
    digests: Annotated[bytes, Blob(32, _check_digest_blob)] = field(repr=False)

    @property
    def block_count(self) -> int:
        """How many block digests the map holds."""
        return len(self.digests) // DIGEST_SIZE

    def digest(self, index: int) -> bytes:
        """The digest of the ``index``-th block of the range."""
        if not 0 <= index < self.block_count:
            raise IndexError(index)
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]


class Chunk(Message):
    """One chunk of disk data: part of an IR or of a delta batch.

    On receipt, ``data`` is the *uncompressed* data as a ``memoryview`` into the
    received buffer (empty for a ZERO chunk), already checked against ``digest``;
    ``flags`` says how it travelled. Treat it as read-only. To send one, prefer
    :meth:`Connection.send_chunk`, which returns the payload buffer untouched.
    """

    __slots__ = ("data", "digest", "disk_index", "flags", "length", "offset")
    TAG: ClassVar[MessageTag] = MessageTag.CHUNK

    def __init__(
        self,
        disk_index: int,
        offset: int,
        length: int,
        digest: bytes,
        data: Bytes,
        flags: ChunkFlags = ChunkFlags.NONE,
    ) -> None:
        self.disk_index = disk_index
        self.offset = offset
        self.length = length
        self.digest = digest
        self.data = data
        self.flags = flags

    @property
    def is_zero(self) -> bool:
        """True when the range is all zeros (nothing was carried)."""
        return bool(self.flags & ChunkFlags.ZERO)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return (
            self.disk_index == other.disk_index
            and self.offset == other.offset
            and self.length == other.length
            and self.digest == other.digest
            and self.is_zero == other.is_zero
            and bytes(self.data) == bytes(other.data)
        )

    __hash__ = None  # type: ignore[assignment]

    def encode_body(self) -> bytes:
        """Not for chunks: ``encode_frame`` and ``Connection.send_chunk`` frame them."""
        raise NotImplementedError("a Chunk is framed by encode_frame or Connection.send_chunk")

    def __repr__(self) -> str:
        return (
            f"Chunk(disk_index={self.disk_index}, offset={self.offset}, length={self.length}, "
            f"digest={bytes(self.digest).hex()}, flags={self.flags!r})"
        )

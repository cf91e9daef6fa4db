"""Messages of a replication session: relationship, IR, delta batches, chunks, digest maps.

The same conventions as ``_messages`` (frozen, slotted, validated on construction and on
decode). :class:`Chunk` is the exception to "frozen": it is built once per chunk of bulk
data on the hot path, so it is a plain slotted class and the connection validates it
instead (``_chunks``, ``_session``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ._enums import AckKind, ChunkFlags, IRState, MessageTag
from ._errors import BadValue
from ._limits import (
    DIGEST_SIZE,
    MAX_BLOCK_SIZE,
    MAX_CONFIG_BLOB,
    MAX_DIGESTS,
    MAX_DISKS,
    MIN_BLOCK_SIZE,
)
from ._messages import Bytes, DiskInfo, Message, check_vmid_uuid, enum_member
from ._validate import check_disk_id, check_vm_name, check_vmid


def _disks_to_fields(disks: tuple[DiskInfo, ...]) -> list[dict[str, Any]]:
    return [{"disk_id": d.disk_id.encode(), "size": d.size} for d in disks]


def _disks_from_fields(items: Any) -> tuple[DiskInfo, ...]:
    return tuple(DiskInfo(check_disk_id(d.disk_id), d.size) for d in items)


def _check_disks(disks: tuple[DiskInfo, ...], *, allow_empty: bool) -> None:
    if not allow_empty and not disks:
        raise BadValue("a VM needs at least one disk")
    if len(disks) > MAX_DISKS:
        raise BadValue(f"{len(disks)} disks, the limit is {MAX_DISKS}")
    seen: set[str] = set()
    for disk in disks:
        check_disk_id(disk.disk_id.encode())
        if disk.disk_id in seen:
            raise BadValue(f"disk id {disk.disk_id!r} appears twice")
        seen.add(disk.disk_id)
        if not 0 < disk.size < 1 << 63:
            raise BadValue(f"disk {disk.disk_id!r} size {disk.size} out of range")


@dataclass(frozen=True, slots=True)
class RelationshipCreate(Message):
    """Primary to recovery server: create the replica of a VM (before its IR)."""

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_CREATE
    vmid: uuid.UUID
    vm_name: str
    disks: tuple[DiskInfo, ...]
    config: bytes = b""

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        check_vm_name(self.vm_name.encode())
        _check_disks(self.disks, allow_empty=False)
        if len(self.config) > MAX_CONFIG_BLOB:
            raise BadValue(f"config blob of {len(self.config)} bytes, limit {MAX_CONFIG_BLOB}")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "vm_name": self.vm_name.encode(),
            "config": self.config,
            "disks": _disks_to_fields(self.disks),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> RelationshipCreate:
        vmid = check_vmid(c.vmid)
        name = check_vm_name(c.vm_name)
        disks = _disks_from_fields(c.disks)
        _check_disks(disks, allow_empty=False)
        if len(c.config) > MAX_CONFIG_BLOB:
            raise BadValue(f"config blob of {len(c.config)} bytes, limit {MAX_CONFIG_BLOB}")
        return cls(vmid, name, disks, bytes(c.config))


@dataclass(frozen=True, slots=True)
class RelationshipOpen(Message):
    """Primary to recovery server: carry on an existing relationship.

    ``generation`` is the relationship's generation as the primary knows it; a recovery
    server whose replica has moved to a newer generation (after a failover) refuses it.
    """

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_OPEN
    vmid: uuid.UUID
    generation: int = 0

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        if not 0 <= self.generation < 1 << 32:
            raise BadValue("generation out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {"vmid": self.vmid.bytes, "generation": self.generation}

    @classmethod
    def _from_fields(cls, c: Any) -> RelationshipOpen:
        return cls(check_vmid(c.vmid), c.generation)


@dataclass(frozen=True, slots=True)
class RelationshipAccepted(Message):
    """Recovery server to primary: the relationship is open; here is where it stands."""

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_ACCEPTED
    vmid: uuid.UUID
    disks: tuple[DiskInfo, ...]
    generation: int = 0
    ir_state: IRState = IRState.NOT_STARTED
    applied_sequence: int = 0
    resume_disk: int = 0
    resume_offset: int = 0

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        _check_disks(self.disks, allow_empty=False)
        if not 0 <= self.generation < 1 << 32:
            raise BadValue("generation out of range")
        if not 0 <= self.applied_sequence < 1 << 64:
            raise BadValue("applied_sequence out of range")
        if not 0 <= self.resume_disk <= len(self.disks):
            raise BadValue(f"resume_disk {self.resume_disk} past the last disk")
        if not 0 <= self.resume_offset < 1 << 64:
            raise BadValue("resume_offset out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "generation": self.generation,
            "ir_state": int(self.ir_state),
            "applied_sequence": self.applied_sequence,
            "resume_disk": self.resume_disk,
            "resume_offset": self.resume_offset,
            "disks": _disks_to_fields(self.disks),
        }

    @classmethod
    def _from_fields(cls, c: Any) -> RelationshipAccepted:
        vmid = check_vmid(c.vmid)
        disks = _disks_from_fields(c.disks)
        _check_disks(disks, allow_empty=False)
        if c.resume_disk > len(disks):
            raise BadValue(f"resume_disk {c.resume_disk} past the last disk")
        return cls(
            vmid=vmid,
            disks=disks,
            generation=c.generation,
            ir_state=enum_member(IRState, c.ir_state, "ir_state"),
            applied_sequence=c.applied_sequence,
            resume_disk=c.resume_disk,
            resume_offset=c.resume_offset,
        )


@dataclass(frozen=True, slots=True)
class RelationshipDelete(Message):
    """Primary to recovery server: end the open relationship and remove its replica.

    Only in an open relationship (SESSION), for that relationship's VM. The recovery
    server answers ``Ack(kind=RELATIONSHIP_DELETED, sequence=0)`` once the replica is gone,
    after which no relationship is open (READY), or refuses with an Error (back to
    SESSION, the relationship still open).
    """

    TAG: ClassVar[MessageTag] = MessageTag.RELATIONSHIP_DELETE
    vmid: uuid.UUID

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)

    def _to_fields(self) -> dict[str, Any]:
        return {"vmid": self.vmid.bytes}

    @classmethod
    def _from_fields(cls, c: Any) -> RelationshipDelete:
        return cls(check_vmid(c.vmid))


@dataclass(frozen=True, slots=True)
class IRBegin(Message):
    """Primary: initial replication starts (or resumes at ``start_disk``/``start_offset``).

    The IR establishes recovery point ``sequence``; delta batches continue after it.
    """

    TAG: ClassVar[MessageTag] = MessageTag.IR_BEGIN
    vmid: uuid.UUID
    sequence: int = 0
    start_disk: int = 0
    start_offset: int = 0
    total_bytes: int = 0

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        for name in ("sequence", "start_offset", "total_bytes"):
            if not 0 <= getattr(self, name) < 1 << 64:
                raise BadValue(f"{name} out of range")
        if not 0 <= self.start_disk <= 0xFFFF:
            raise BadValue("start_disk out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "sequence": self.sequence,
            "start_disk": self.start_disk,
            "start_offset": self.start_offset,
            "total_bytes": self.total_bytes,
        }

    @classmethod
    def _from_fields(cls, c: Any) -> IRBegin:
        return cls(check_vmid(c.vmid), c.sequence, c.start_disk, c.start_offset, c.total_bytes)


_End = TypeVar("_End", bound="_TransferEnd")


@dataclass(frozen=True, slots=True)
class _TransferEnd(Message):
    """The end of an IR or a batch: its sequence, chunk count and aggregate digest."""

    vmid: uuid.UUID
    sequence: int
    chunk_count: int
    aggregate_digest: bytes

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        _check_sequence_and_digest(self.sequence, self.chunk_count, self.aggregate_digest)

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "sequence": self.sequence,
            "chunk_count": self.chunk_count,
            "aggregate_digest": self.aggregate_digest,
        }

    @classmethod
    def _from_fields(cls: type[_End], c: Any) -> _End:
        return cls(check_vmid(c.vmid), c.sequence, c.chunk_count, bytes(c.aggregate_digest))


@dataclass(frozen=True, slots=True)
class IREnd(_TransferEnd):
    """Primary: initial replication is complete; counts and digest of what was sent."""

    TAG: ClassVar[MessageTag] = MessageTag.IR_END


@dataclass(frozen=True, slots=True)
class BatchEnd(_TransferEnd):
    """Primary: the batch's last chunk was sent; counts and digest of the batch."""

    TAG: ClassVar[MessageTag] = MessageTag.BATCH_END


def _check_sequence_and_digest(sequence: int, chunk_count: int, digest: bytes) -> None:
    if not 0 <= sequence < 1 << 64:
        raise BadValue("sequence out of range")
    if not 0 <= chunk_count < 1 << 32:
        raise BadValue("chunk_count out of range")
    if len(digest) != DIGEST_SIZE:
        raise BadValue(f"digest must be {DIGEST_SIZE} bytes")


@dataclass(frozen=True, slots=True)
class BatchBegin(Message):
    """Primary: a delta batch (one replication cycle, all of the VM's disks) starts.

    ``sequence`` must be ``base_sequence + 1`` in ordinary replication; a recovery
    server refuses a batch whose base is not its applied sequence (OUT_OF_SEQUENCE).
    """

    TAG: ClassVar[MessageTag] = MessageTag.BATCH_BEGIN
    vmid: uuid.UUID
    sequence: int
    base_sequence: int
    chunk_count: int
    total_bytes: int = 0
    captured_at_ms: int = 0

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        for name in ("sequence", "base_sequence", "total_bytes", "captured_at_ms"):
            if not 0 <= getattr(self, name) < 1 << 64:
                raise BadValue(f"{name} out of range")
        if not 0 <= self.chunk_count < 1 << 32:
            raise BadValue("chunk_count out of range")
        if self.sequence <= self.base_sequence:
            raise BadValue(f"sequence {self.sequence} not after base {self.base_sequence}")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "sequence": self.sequence,
            "base_sequence": self.base_sequence,
            "chunk_count": self.chunk_count,
            "total_bytes": self.total_bytes,
            "captured_at_ms": self.captured_at_ms,
        }

    @classmethod
    def _from_fields(cls, c: Any) -> BatchBegin:
        if c.sequence <= c.base_sequence:
            raise BadValue(f"sequence {c.sequence} not after base {c.base_sequence}")
        return cls(
            check_vmid(c.vmid),
            c.sequence,
            c.base_sequence,
            c.chunk_count,
            c.total_bytes,
            c.captured_at_ms,
        )


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Recovery server: the IR is complete, a batch is applied durably, or the replica
    is removed (after a RelationshipDelete; sequence 0)."""

    TAG: ClassVar[MessageTag] = MessageTag.ACK
    vmid: uuid.UUID
    kind: AckKind
    sequence: int

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        if not 0 <= self.sequence < 1 << 64:
            raise BadValue("sequence out of range")

    def _to_fields(self) -> dict[str, Any]:
        return {"vmid": self.vmid.bytes, "kind": int(self.kind), "sequence": self.sequence}

    @classmethod
    def _from_fields(cls, c: Any) -> Ack:
        return cls(check_vmid(c.vmid), enum_member(AckKind, c.kind, "kind"), c.sequence)


def _check_digest_range(block_size: int, disk_index: int, offset: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise BadValue(f"block size {block_size} outside {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}")
    if not 0 <= disk_index <= 0xFFFF:
        raise BadValue("disk_index out of range")
    if not 0 <= offset < 1 << 64:
        raise BadValue("offset out of range")


@dataclass(frozen=True, slots=True)
class DigestMapRequest(Message):
    """Primary: send me the block digests of this range of a disk (resync, verify)."""

    TAG: ClassVar[MessageTag] = MessageTag.DIGEST_MAP_REQUEST
    vmid: uuid.UUID
    disk_index: int
    block_size: int
    offset: int
    block_count: int

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        _check_digest_range(self.block_size, self.disk_index, self.offset)
        if not 0 < self.block_count <= MAX_DIGESTS:
            raise BadValue(f"block_count {self.block_count} outside 1-{MAX_DIGESTS}")

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "disk_index": self.disk_index,
            "block_size": self.block_size,
            "offset": self.offset,
            "block_count": self.block_count,
        }

    @classmethod
    def _from_fields(cls, c: Any) -> DigestMapRequest:
        vmid = check_vmid(c.vmid)
        _check_digest_range(c.block_size, c.disk_index, c.offset)
        if not 0 < c.block_count <= MAX_DIGESTS:
            raise BadValue(f"block_count {c.block_count} outside 1-{MAX_DIGESTS}")
        return cls(vmid, c.disk_index, c.block_size, c.offset, c.block_count)


@dataclass(frozen=True, slots=True)
class DigestMap(Message):
    """Recovery server: the XXH3-128 digest of each block, concatenated in order.

    A block that runs past the end of the disk is digested over the bytes that exist.
    """

    TAG: ClassVar[MessageTag] = MessageTag.DIGEST_MAP
    vmid: uuid.UUID
    disk_index: int
    block_size: int
    offset: int
    digests: bytes = field(repr=False)

    @property
    def block_count(self) -> int:
        """How many block digests the map holds."""
        return len(self.digests) // DIGEST_SIZE

    def digest(self, index: int) -> bytes:
        """The digest of the ``index``-th block of the range."""
        if not 0 <= index < self.block_count:
            raise IndexError(index)
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def _validate(self) -> None:
        check_vmid_uuid(self.vmid)
        _check_digest_range(self.block_size, self.disk_index, self.offset)
        _check_digest_blob(len(self.digests))

    def _to_fields(self) -> dict[str, Any]:
        return {
            "vmid": self.vmid.bytes,
            "disk_index": self.disk_index,
            "block_size": self.block_size,
            "offset": self.offset,
            "digests": self.digests,
        }

    @classmethod
    def _from_fields(cls, c: Any) -> DigestMap:
        vmid = check_vmid(c.vmid)
        _check_digest_range(c.block_size, c.disk_index, c.offset)
        _check_digest_blob(len(c.digests))
        return cls(vmid, c.disk_index, c.block_size, c.offset, bytes(c.digests))


def _check_digest_blob(size: int) -> None:
    if size % DIGEST_SIZE:
        raise BadValue(f"digest map of {size} bytes is not a multiple of {DIGEST_SIZE}")
    if size // DIGEST_SIZE > MAX_DIGESTS:
        raise BadValue(f"digest map over {MAX_DIGESTS} digests")


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

    def __repr__(self) -> str:
        return (
            f"Chunk(disk_index={self.disk_index}, offset={self.offset}, length={self.length}, "
            f"digest={bytes(self.digest).hex()}, flags={self.flags!r})"
        )

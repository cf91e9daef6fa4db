"""Hypothesis strategies for every frproto message, inside every limit and validation rule.

Each strategy only produces values that the message constructors accept (so they are
also what a correct peer may send). Several take optional arguments that pin fields a
:class:`~frproto.Connection` checks against the open session (VMID, disks), so that the
same strategies drive both the stateless round trips and the conversations.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Sequence

from hypothesis import strategies as st

import frproto as fp
from frproto.limits import (
    DIGEST_SIZE,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_DATA,
    MAX_DIGESTS,
    MAX_DISK_ID,
    MAX_DISKS,
    MAX_ERROR_TEXT,
    MAX_FQDN,
    MAX_NAME,
    MIN_BLOCK_SIZE,
)

U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_DISK_SIZE = (1 << 63) - 1

_VARIANT_MASK = 0xC000 << 48
_VARIANT_RFC = 0x8000 << 48

u16s = st.integers(0, U16)
u32s = st.integers(0, U32)
u64s = st.integers(0, U64)
digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)


# -- identifiers and names -----------------------------------------------------------------


def vmids() -> st.SearchStrategy[uuid.UUID]:
    """Random GUIDs of the RFC 9562 variant (any version bits), never nil or max."""
    return st.integers(0, (1 << 128) - 1).map(
        lambda i: uuid.UUID(int=(i & ~_VARIANT_MASK) | _VARIANT_RFC)
    )


def _name_ok(name: str) -> bool:
    return 1 <= len(name.encode()) <= MAX_NAME and name not in (".", "..")


#: Characters a VM name may hold: printable, no surrogates, controls, or separators.
_NAME_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs"),
    blacklist_characters="/\\\x00",
)


def vm_names() -> st.SearchStrategy[str]:
    """Printable unicode VM names, 1-255 UTF-8 bytes, no ``/ \\ NUL``, not ``.``/``..``."""
    short = st.text(_NAME_CHARS, min_size=1, max_size=40)
    longest = st.integers(1, MAX_NAME).map(lambda n: "v" * n)
    wide = st.integers(1, MAX_NAME // 4).map(lambda n: "\U0001f5a5" * n)  # 4-byte chars
    return st.one_of(short, longest, wide).filter(_name_ok)


def disk_ids() -> st.SearchStrategy[str]:
    """Disk identifiers: 1-64 bytes of ``[A-Za-z0-9._-]``, not starting with a dot."""
    first = string.ascii_letters + string.digits + "_-"
    rest = first + "."
    return st.builds(
        lambda a, b: a + b,
        st.sampled_from(first),
        st.text(st.sampled_from(rest), max_size=MAX_DISK_ID - 1),
    )


_LABEL_CHARS = string.ascii_letters + string.digits


@st.composite
def _dns_labels(draw: st.DrawFn) -> str:
    size = draw(st.integers(1, 63))
    if size == 1:
        return draw(st.sampled_from(_LABEL_CHARS))
    inner = draw(st.text(st.sampled_from(_LABEL_CHARS + "-"), min_size=size - 2, max_size=size - 2))
    ends = draw(st.text(st.sampled_from(_LABEL_CHARS), min_size=2, max_size=2))
    return ends[0] + inner + ends[1]


@st.composite
def dns_names(draw: st.DrawFn) -> str:
    """LDH DNS names of up to 253 bytes (with or without the root's trailing dot)."""
    labels = draw(st.lists(_dns_labels(), min_size=1, max_size=6))
    name = ".".join(labels)
    while len(name) > MAX_FQDN - 1:
        labels.pop()
        name = ".".join(labels) if labels else "a"
    if draw(st.booleans()):
        name += "."
    return name


def server_names() -> st.SearchStrategy[str]:
    """Recovery server names: DNS names, IPv4 and IPv6 literals."""
    return st.one_of(dns_names(), st.ip_addresses().map(str))


def disk_sizes(min_size: int = 1) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(min_size, MAX_DISK_SIZE),
        st.integers(min_size, max(min_size, 1 << 24)),
    )


@st.composite
def disk_lists(
    draw: st.DrawFn, min_disks: int = 1, max_disks: int = 8, min_size: int = 1
) -> tuple[fp.DiskInfo, ...]:
    """Disks with unique ids (1 to ``max_disks``, never more than MAX_DISKS)."""
    ids = draw(
        st.lists(disk_ids(), min_size=min_disks, max_size=min(max_disks, MAX_DISKS), unique=True)
    )
    return tuple(fp.DiskInfo(i, draw(disk_sizes(min_size))) for i in ids)


def many_disks() -> st.SearchStrategy[tuple[fp.DiskInfo, ...]]:
    """The largest disk lists (exactly MAX_DISKS)."""
    return st.just(MAX_DISKS).map(
        lambda n: tuple(fp.DiskInfo(f"disk-{i}", 1 << 30) for i in range(n))
    )


def error_texts() -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=["Cs"]), max_size=200).filter(
        lambda t: len(t.encode()) <= MAX_ERROR_TEXT
    ) | st.just(MAX_ERROR_TEXT // 2).map(lambda n: "é" * n)


# -- messages ------------------------------------------------------------------------------


def negotiate_requests() -> st.SearchStrategy[fp.NegotiateRequest]:
    return st.builds(
        fp.NegotiateRequest,
        version=st.tuples(st.integers(0, 255), st.integers(0, 255)),
        compression=st.integers(0, 3).map(fp.CompressionSet),
        encryption=st.integers(0, 3).map(fp.EncryptionSet),
        auth_type=st.sampled_from(fp.AuthType),
    )


def negotiate_responses(
    ok: bool | None = None,
    recovery_type: fp.RecoveryType | None = None,
    compression: fp.Compression | None = None,
) -> st.SearchStrategy[fp.NegotiateResponse]:
    """Responses; ``ok=True`` only compatible OK ones, ``ok=False`` only refusals."""
    if ok is None:
        status = st.one_of(st.sampled_from(fp.ErrorCode), u16s)
        verdict = st.sampled_from(fp.VersionVerdict)
    elif ok:
        status, verdict = st.just(0), st.just(fp.VersionVerdict.COMPATIBLE)
    else:
        status = st.integers(1, U16)
        verdict = st.sampled_from(fp.VersionVerdict)
    strategy = st.builds(
        fp.NegotiateResponse,
        status=status,
        verdict=verdict,
        version=st.tuples(st.integers(0, 255), st.integers(0, 255)),
        recovery_type=st.just(recovery_type) if recovery_type else st.sampled_from(fp.RecoveryType),
        compression=st.just(compression) if compression else st.sampled_from(fp.Compression),
        encryption=st.sampled_from(fp.Encryption),
        auth_type=st.sampled_from(fp.AuthType),
        server_name=server_names(),
    )
    if ok is False:
        return strategy | st.builds(
            fp.NegotiateResponse,
            status=st.just(0),
            verdict=st.just(fp.VersionVerdict.MISMATCH),
            server_name=server_names(),
        )
    return strategy


def query_recovery_servers() -> st.SearchStrategy[fp.QueryRecoveryServer]:
    return st.builds(
        fp.QueryRecoveryServer,
        vmid=vmids(),
        vm_name=vm_names(),
        disk_sizes=st.lists(st.integers(1, MAX_DISK_SIZE), max_size=12).map(tuple)
        | st.just(MAX_DISKS).map(lambda n: (1,) * n),
    )


def query_recovery_server_responses(
    vmid: uuid.UUID | None = None,
) -> st.SearchStrategy[fp.QueryRecoveryServerResponse]:
    return st.builds(
        fp.QueryRecoveryServerResponse,
        vmid=st.just(vmid) if vmid else vmids(),
        server_name=server_names(),
        port=st.integers(1, U16),
        existing=st.sampled_from(fp.ExistingVM),
    )


def errors() -> st.SearchStrategy[fp.Error]:
    return st.builds(
        fp.Error,
        code=st.one_of(st.sampled_from([c for c in fp.ErrorCode if c]), st.integers(1, U16)),
        text=error_texts(),
    )


def keepalives() -> st.SearchStrategy[fp.Keepalive]:
    return st.builds(fp.Keepalive, token=u64s)


def relationship_creates(
    vmid: uuid.UUID | None = None, disks: st.SearchStrategy[tuple[fp.DiskInfo, ...]] | None = None
) -> st.SearchStrategy[fp.RelationshipCreate]:
    return st.builds(
        fp.RelationshipCreate,
        vmid=st.just(vmid) if vmid else vmids(),
        vm_name=vm_names(),
        disks=disks if disks is not None else (disk_lists() | many_disks()),
        config=st.binary(max_size=512),
    )


def relationship_opens(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.RelationshipOpen]:
    return st.builds(fp.RelationshipOpen, vmid=st.just(vmid) if vmid else vmids(), generation=u32s)


@st.composite
def relationship_accepteds(
    draw: st.DrawFn,
    vmid: uuid.UUID | None = None,
    disks: tuple[fp.DiskInfo, ...] | None = None,
) -> fp.RelationshipAccepted:
    if disks is None:
        disks = draw(disk_lists() | many_disks())
    return fp.RelationshipAccepted(
        vmid=vmid if vmid else draw(vmids()),
        disks=disks,
        generation=draw(u32s),
        ir_state=draw(st.sampled_from(fp.IRState)),
        applied_sequence=draw(u64s),
        resume_disk=draw(st.integers(0, len(disks))),
        resume_offset=draw(u64s),
    )


def relationship_deletes(
    vmid: uuid.UUID | None = None,
) -> st.SearchStrategy[fp.RelationshipDelete]:
    return st.builds(fp.RelationshipDelete, vmid=st.just(vmid) if vmid else vmids())


@st.composite
def ir_begins(
    draw: st.DrawFn,
    vmid: uuid.UUID | None = None,
    disks: Sequence[fp.DiskInfo] | None = None,
) -> fp.IRBegin:
    """IRBegins; with ``disks``, the resume point lies within them (as a session needs)."""
    if disks is None:
        start_disk, start_offset = draw(u16s), draw(u64s)
    else:
        start_disk = draw(st.integers(0, len(disks)))
        top = disks[start_disk].size if start_disk < len(disks) else U64
        start_offset = draw(st.integers(0, top))
    return fp.IRBegin(
        vmid=vmid if vmid else draw(vmids()),
        sequence=draw(u64s),
        start_disk=start_disk,
        start_offset=start_offset,
        total_bytes=draw(u64s),
    )


def ir_ends(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.IREnd]:
    return st.builds(
        fp.IREnd,
        vmid=st.just(vmid) if vmid else vmids(),
        sequence=u64s,
        chunk_count=u32s,
        aggregate_digest=digests,
    )


@st.composite
def batch_begins(
    draw: st.DrawFn, vmid: uuid.UUID | None = None, max_chunks: int = U32
) -> fp.BatchBegin:
    base = draw(st.integers(0, U64 - 1))
    return fp.BatchBegin(
        vmid=vmid if vmid else draw(vmids()),
        sequence=draw(st.integers(base + 1, U64) | st.just(base + 1)),
        base_sequence=base,
        chunk_count=draw(st.integers(0, max_chunks)),
        total_bytes=draw(u64s),
        captured_at_ms=draw(u64s),
    )


def batch_ends(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.BatchEnd]:
    return st.builds(
        fp.BatchEnd,
        vmid=st.just(vmid) if vmid else vmids(),
        sequence=u64s,
        chunk_count=u32s,
        aggregate_digest=digests,
    )


def acks(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.Ack]:
    return st.builds(
        fp.Ack,
        vmid=st.just(vmid) if vmid else vmids(),
        kind=st.sampled_from(fp.AckKind),
        sequence=u64s,
    )


block_sizes = st.one_of(
    st.integers(MIN_BLOCK_SIZE, MAX_BLOCK_SIZE),
    st.sampled_from([MIN_BLOCK_SIZE, 65536, 1 << 20, MAX_BLOCK_SIZE]),
)


@st.composite
def digest_map_requests(
    draw: st.DrawFn,
    vmid: uuid.UUID | None = None,
    disks: Sequence[fp.DiskInfo] | None = None,
    max_blocks: int = MAX_DIGESTS,
) -> fp.DigestMapRequest:
    """Requests; with ``disks``, for an existing disk, starting inside it."""
    if disks is None:
        disk_index, offset = draw(u16s), draw(u64s)
    else:
        disk_index = draw(st.integers(0, len(disks) - 1))
        offset = draw(st.integers(0, disks[disk_index].size - 1))
    return fp.DigestMapRequest(
        vmid=vmid if vmid else draw(vmids()),
        disk_index=disk_index,
        block_size=draw(block_sizes),
        offset=offset,
        block_count=draw(st.integers(1, max_blocks)),
    )


def digest_blobs(max_digests: int = 64) -> st.SearchStrategy[bytes]:
    return st.integers(0, max_digests).flatmap(
        lambda n: st.binary(min_size=n * DIGEST_SIZE, max_size=n * DIGEST_SIZE)
    )


def digest_maps(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.DigestMap]:
    return st.builds(
        fp.DigestMap,
        vmid=st.just(vmid) if vmid else vmids(),
        disk_index=u16s,
        block_size=block_sizes,
        offset=u64s,
        digests=digest_blobs() | st.just(MAX_DIGESTS * DIGEST_SIZE).map(bytes),
    )


def failover_requests(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.FailoverRequest]:
    return st.builds(
        fp.FailoverRequest,
        vmid=st.just(vmid) if vmid else vmids(),
        sequence=u64s,
        block_size=block_sizes,
        state_digest=digests,
        reverse_port=u16s,
    )


def failover_asks(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.FailoverAsk]:
    return st.builds(fp.FailoverAsk, vmid=st.just(vmid) if vmid else vmids())


def failover_declines(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.FailoverDecline]:
    # A reason of at most 1024 bytes of UTF-8: 256 characters of up to 4 bytes each.
    return st.builds(
        fp.FailoverDecline,
        vmid=st.just(vmid) if vmid else vmids(),
        reason=st.text(st.characters(exclude_categories=["Cs"]), max_size=256),
    )


def failover_dones(vmid: uuid.UUID | None = None) -> st.SearchStrategy[fp.FailoverDone]:
    return st.builds(
        fp.FailoverDone,
        vmid=st.just(vmid) if vmid else vmids(),
        generation=u32s,
        sequence=u64s,
    )


# -- chunk data ----------------------------------------------------------------------------


def random_data(max_size: int = 4096) -> st.SearchStrategy[bytes]:
    """Incompressible-ish data, never all zeros."""
    return st.binary(min_size=1, max_size=max_size).filter(any)


def compressible_data(min_size: int = 256, max_size: int = 65536) -> st.SearchStrategy[bytes]:
    """Data that zstd and LZ4 both make smaller (a short pattern repeated), not all zeros."""
    return st.tuples(
        st.binary(min_size=1, max_size=16).filter(any), st.integers(min_size, max_size)
    ).map(lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]])


def zero_lengths() -> st.SearchStrategy[int]:
    return st.integers(1, 8192) | st.sampled_from([4096, 65536, MAX_CHUNK_DATA])


def chunk_data() -> st.SearchStrategy[bytes]:
    """Any chunk data: random, compressible or all zeros."""
    return st.one_of(random_data(), compressible_data(max_size=8192), zero_lengths().map(bytes))


@st.composite
def chunks(draw: st.DrawFn, zero: bool | None = None) -> fp.Chunk:
    """Chunks as a receiver sees them: data digested, ZERO chunks carrying nothing."""
    disk_index, offset = draw(u16s), draw(u64s)
    if zero is None:
        zero = draw(st.booleans())
    if zero:
        length = draw(zero_lengths())
        return fp.Chunk(
            disk_index, offset, length, fp.codec.zero_digest(length), b"", fp.ChunkFlags.ZERO
        )
    data = draw(random_data() | compressible_data(max_size=8192))
    return fp.Chunk(disk_index, offset, len(data), fp.codec.chunk_digest(data), data)


# -- everything ----------------------------------------------------------------------------

#: One strategy per message class (for "every class" tests).
MESSAGE_STRATEGIES: dict[type[fp.Message], st.SearchStrategy[fp.Message]] = {
    fp.NegotiateRequest: negotiate_requests(),
    fp.NegotiateResponse: negotiate_responses(),
    fp.QueryRecoveryServer: query_recovery_servers(),
    fp.QueryRecoveryServerResponse: query_recovery_server_responses(),
    fp.Error: errors(),
    fp.Keepalive: keepalives(),
    fp.RelationshipCreate: relationship_creates(),
    fp.RelationshipOpen: relationship_opens(),
    fp.RelationshipAccepted: relationship_accepteds(),
    fp.RelationshipDelete: relationship_deletes(),
    fp.IRBegin: ir_begins(),
    fp.IREnd: ir_ends(),
    fp.BatchBegin: batch_begins(),
    fp.BatchEnd: batch_ends(),
    fp.Ack: acks(),
    fp.DigestMapRequest: digest_map_requests(),
    fp.DigestMap: digest_maps(),
    fp.FailoverRequest: failover_requests(),
    fp.FailoverDone: failover_dones(),
    fp.FailoverAsk: failover_asks(),
    fp.FailoverDecline: failover_declines(),
    fp.Chunk: chunks(),
}


def messages() -> st.SearchStrategy[fp.Message]:
    """Any message of any class."""
    return st.one_of(*MESSAGE_STRATEGIES.values())

"""(Re)write the golden test vectors in this directory, deterministically.

Run from the repository root::

    .venv/bin/python tests/vectors/generate.py          # rewrite messages/ and errors/
    .venv/bin/python tests/vectors/generate.py --check  # exit 1 if the files differ

Everything here is fixed (UUIDs, data, names), and the JSON is written with sorted keys
and an indent of 2, so running it twice gives the same bytes. Before writing, every vector
is checked against frproto: message frames must round-trip and be accepted by a
connection in context, and every error input must raise exactly its error class. A
vector that frproto does not agree with stops the script (exit status 2).

The malformed inputs are packed by hand below (``struct``), not with frproto's own
schemas, so that they say what the bytes are independently of the library. The format of
the files is described in README.md next to this script.
"""

from __future__ import annotations

import argparse
import struct
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import frproto  # noqa: E402
from frproto import (  # noqa: E402
    Ack,
    AckKind,
    AuthType,
    BatchBegin,
    BatchEnd,
    Chunk,
    ChunkFlags,
    Compression,
    CompressionSet,
    DigestMap,
    DigestMapRequest,
    DiskInfo,
    EncryptionSet,
    Error,
    ErrorCode,
    ExistingVM,
    FailoverAsk,
    FailoverDecline,
    FailoverDone,
    FailoverRequest,
    IRBegin,
    IREnd,
    IRState,
    Keepalive,
    Message,
    MessageTag,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    QueryRecoveryServerResponse,
    RecoveryType,
    RelationshipAccepted,
    RelationshipCreate,
    RelationshipDelete,
    RelationshipOpen,
    RemoteProtocolError,
    Role,
    VersionVerdict,
)
from frproto.limits import MAX_CHUNK_DATA, MAX_CONTROL_BODY  # noqa: E402
from tests.frproto.vectors import (  # noqa: E402
    CONTEXT_DISKS,
    CONTEXT_VMID,
    ERRORS_SUBDIR,
    MESSAGES_SUBDIR,
    ErrorCase,
    ErrorVectors,
    MessageCase,
    MessageVectors,
    PreludeStep,
    dump_json,
    feed,
    handshake,
    message_context,
    open_session,
    run_error_case,
    run_prelude,
)

HERE = Path(__file__).resolve().parent
T = MessageTag
P, R = Role.PRIMARY, Role.RECOVERY

# -- Fixed values ----------------------------------------------------------------------------

VMID = CONTEXT_VMID
#: A second VM, for the rich cases.
VMID_B = uuid.UUID("c0ffee00-1234-4abc-9def-0123456789ab")
#: CONTEXT_VMID with the variant bits changed (byte 8): NCS, Microsoft, future.
VMID_NCS = uuid.UUID("5f0c6f1e-3a4b-4c2d-0e9f-0a1b2c3d4e5f")
VMID_MICROSOFT = uuid.UUID("5f0c6f1e-3a4b-4c2d-ce9f-0a1b2c3d4e5f")
#: CONTEXT_VMID with version nibble 0 (byte 6): valid, the version is not checked.
VMID_VERSION_0 = uuid.UUID("5f0c6f1e-3a4b-0c2d-8e9f-0a1b2c3d4e5f")

#: 64 bytes of plain chunk data (no zeros, no run long enough to matter).
PLAIN_DATA = bytes((i * 37 + 11) % 251 for i in range(64))
#: 128 bytes of "A" and the zstd frame of it (content size 128 declared), made once with
#: zstd level 1 and kept as bytes: the decoder side of zstd is stable, the encoder is not.
ZSTD_A128 = bytes.fromhex("28b52ffd208045000010414101003b0558")
#: 64 bytes of "A" as a zstd frame that does not declare its content size.
ZSTD_A64_NO_SIZE = bytes.fromhex("28b52ffd00004500001041410100930016")
#: 64 bytes of "A" as an LZ4 block (no size prefix).
LZ4_A64 = bytes.fromhex("1f41010027504141414141")
WRONG_DIGEST = bytes.fromhex("00112233445566778899aabbccddeeff")


def digest(data: bytes) -> bytes:
    """The chunk digest (XXH3-128) of ``data``."""
    return frproto.codec.chunk_digest(data)


def aggregate(*digests: bytes) -> bytes:
    """The aggregate digest of chunks with these digests."""
    agg = frproto.codec.AggregateDigest()
    for d in digests:
        agg.add(d)
    return agg.digest()


#: The Chunk vectors, in file order. IREnd and BatchEnd vectors with chunk_count n carry
#: the aggregate digest of the first n of these.
CHUNKS: tuple[Chunk, ...] = (
    Chunk(0, 0, len(PLAIN_DATA), digest(PLAIN_DATA), PLAIN_DATA),
    Chunk(1, 4096, 4096, frproto.codec.zero_digest(4096), b"", ChunkFlags.ZERO),
    Chunk(1, (1 << 16) - 16, 16, digest(PLAIN_DATA[:16]), PLAIN_DATA[:16]),
)

# -- Hand packing ----------------------------------------------------------------------------


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def text8(raw: bytes) -> bytes:
    return u8(len(raw)) + raw


def text16(raw: bytes) -> bytes:
    return u16(len(raw)) + raw


def envelope(tag: int, length: int, reserved: int = 0) -> bytes:
    """The 8-byte envelope: reserved, tag type, tag length."""
    return struct.pack(">HHI", reserved, tag, length)


def frame(tag: int, body: bytes, reserved: int = 0) -> bytes:
    """Envelope plus body."""
    return envelope(tag, len(body), reserved) + body


def chunk_frame(
    disk_index: int,
    offset: int,
    length: int,
    chunk_digest: bytes,
    payload: bytes = b"",
    flags: int = 0,
    reserved: int = 0,
) -> bytes:
    """A Chunk frame: envelope, the 32-byte chunk header, the payload."""
    header = struct.pack(">HHQI16s", disk_index, flags, offset, length, chunk_digest)
    return frame(T.CHUNK, header + payload, reserved)


def negotiate_request_body(
    major: int = 1, minor: int = 0, compression: int = 3, encryption: int = 2, auth: int = 2
) -> bytes:
    return u8(major) + u8(minor) + u16(compression) + u16(encryption) + u8(auth)


def negotiate_response_body(
    recovery_type: int = 1,
    server_name: bytes = b"recovery.example.net",
    verdict: int = 1,
    *,
    version: tuple[int, int] = (1, 0),
    compression: int = 0,
    encryption: int = 1,
    auth: int = 2,
) -> bytes:
    # status, verdict, version major/minor, recovery type, compression, encryption, auth
    fixed = u16(0) + u8(verdict) + u8(version[0]) + u8(version[1]) + u8(recovery_type)
    fixed += u8(compression) + u8(encryption) + u8(auth)
    return fixed + text8(server_name)


def disks_body(disks: Sequence[tuple[bytes, int]]) -> bytes:
    return u16(len(disks)) + b"".join(text8(d) + u64(size) for d, size in disks)


def relationship_create_body(
    vmid: bytes = VMID.bytes,
    name: bytes = b"web-01",
    disks: Sequence[tuple[bytes, int]] = ((b"system", 1 << 20),),
    config: bytes = b"",
) -> bytes:
    return vmid + text16(name) + u32(len(config)) + config + disks_body(disks)


def relationship_open_body(vmid: bytes, generation: int = 1) -> bytes:
    return vmid + u32(generation)


def query_body(vmid: bytes, name: bytes, sizes: Sequence[int] = (), count: int = -1) -> bytes:
    n = len(sizes) if count < 0 else count
    return vmid + text16(name) + u16(n) + b"".join(u64(s) for s in sizes)


def end_body(vmid: bytes, sequence: int, chunk_count: int, agg: bytes) -> bytes:
    """The body of an IREnd or a BatchEnd."""
    return vmid + u64(sequence) + u32(chunk_count) + agg


# -- Message vectors -------------------------------------------------------------------------

MessageSpec = tuple[str, str, Message]

LONG_LABEL = "a" * 63
MAX_SERVER_NAME = ".".join([LONG_LABEL, LONG_LABEL, LONG_LABEL, "b" * 61])  # 253 bytes
UNICODE_NAME = "Büro-Server (prod) \u00e9t\u00e9 \U0001f5a5"
#: The listeners whose refusals the vectors show: a cluster node, and the CAP's name at a
#: node (both with the reference preferences: LZ4 first, so a non-refusal would choose it).
_NODE_POLICY = frproto.ServerPolicy(RecoveryType.CLUSTER_NODE, "r1.dr.example.com")
_CAP_POLICY = frproto.ServerPolicy(RecoveryType.CLUSTERING_BROKER, "cap.dr.example.com")

MESSAGE_SPECS: dict[type[Message], list[MessageSpec]] = {
    NegotiateRequest: [
        (
            "defaults",
            "Version 1.1, offers zstd and LZ4, TLS 1.3, certificates.",
            NegotiateRequest(),
        ),
        (
            "everything_offered",
            "A newer minor version, every compression and encryption bit, integrated auth.",
            NegotiateRequest(
                version=(1, 7),
                compression=CompressionSet.ZSTD | CompressionSet.LZ4,
                encryption=EncryptionSet.NONE | EncryptionSet.TLS13,
                auth_type=AuthType.INTEGRATED,
            ),
        ),
        (
            "nothing_offered",
            "No compression offered (empty bit set), only an unencrypted stream.",
            NegotiateRequest(compression=CompressionSet(0), encryption=EncryptionSet.NONE),
        ),
    ],
    NegotiateResponse: [
        (
            "defaults",
            "Compatible stand-alone server, no compression, TLS 1.3.",
            NegotiateResponse(),
        ),
        (
            "broker_zstd",
            "A clustering broker that chose zstd.",
            NegotiateResponse(
                recovery_type=RecoveryType.CLUSTERING_BROKER,
                compression=Compression.ZSTD,
                server_name="broker.dr.example.com",
            ),
        ),
        (
            "mismatch",
            "Version mismatch: status PROTOCOL_MISMATCH, verdict MISMATCH, an IPv6 literal name.",
            NegotiateResponse(
                status=ErrorCode.PROTOCOL_MISMATCH,
                verdict=VersionVerdict.MISMATCH,
                version=(2, 0),
                recovery_type=RecoveryType.CLUSTER_NODE,
                compression=Compression.LZ4,
                encryption=frproto.Encryption.NONE,
                auth_type=AuthType.INTEGRATED,
                server_name="2001:db8::1",
            ),
        ),
        (
            "max_name_unknown_status",
            "A 253-byte server name (the limit) and a status code this version does not know.",
            NegotiateResponse(status=777, server_name=MAX_SERVER_NAME),
        ),
        # Refusals (NEG-12), built by frproto.refuse_negotiation from a request that offers
        # both compressions: NONE in every one, whatever the server would have chosen.
        (
            "refusal_not_authorized_peer",
            "TLS-4: a peer whose certificate is not authorized, for the default request (1.1, "
            "ZSTD|LZ4, TLS13, CERTIFICATE): NOT_AUTHORIZED, COMPATIBLE, 1.1, compression NONE.",
            frproto.refuse_negotiation(NegotiateRequest(), _NODE_POLICY, ErrorCode.NOT_AUTHORIZED),
        ),
        (
            "refusal_integrated_auth",
            "NEG-3: INTEGRATED auth not accepted: NOT_AUTHORIZED, auth_type INTEGRATED echoed, "
            "the lower minor (1.1 for a 1.7 request), compression NONE.",
            frproto.refuse_negotiation(
                NegotiateRequest(version=(1, 7), auth_type=AuthType.INTEGRATED),
                _NODE_POLICY,
                ErrorCode.NOT_AUTHORIZED,
            ),
        ),
        (
            "refusal_protocol_mismatch",
            "NEG-2: a 2.0 request: PROTOCOL_MISMATCH, MISMATCH, the server's own 1.1, "
            "compression NONE.",
            frproto.refuse_negotiation(
                NegotiateRequest(version=(2, 0)), _NODE_POLICY, ErrorCode.PROTOCOL_MISMATCH
            ),
        ),
        (
            "refusal_not_supported",
            "NEG-4: only an unencrypted stream offered to a TLS 1.3 server: NOT_SUPPORTED, "
            "encryption TLS13 (the server's own level), compression NONE.",
            frproto.refuse_negotiation(
                NegotiateRequest(encryption=EncryptionSet.NONE),
                _NODE_POLICY,
                ErrorCode.NOT_SUPPORTED,
            ),
        ),
        (
            "refusal_busy_cap_at_node",
            "TLS-10: the CAP's name at a node that does not run the broker now: BUSY, "
            "CLUSTERING_BROKER, the CAP name, compression NONE.",
            frproto.refuse_negotiation(NegotiateRequest(), _CAP_POLICY, ErrorCode.BUSY),
        ),
    ],
    QueryRecoveryServer: [
        ("minimal", "A one-letter VM name and no disk sizes.", QueryRecoveryServer(VMID, "a")),
        (
            "rich",
            "A non-ASCII VM name and disk sizes including 0 and 2**63-1.",
            QueryRecoveryServer(VMID_B, UNICODE_NAME, (1, 1 << 30, (1 << 63) - 1)),
        ),
        (
            "max_name",
            "A VM name of 255 bytes (the limit).",
            QueryRecoveryServer(VMID, "v" * 255, (1 << 20,)),
        ),
    ],
    QueryRecoveryServerResponse: [
        (
            "new",
            "A node that will hold a new replica.",
            QueryRecoveryServerResponse(VMID, "node1.cluster.local", 8443, ExistingVM.NEW),
        ),
        (
            "existing_ipv4",
            "An existing replica on a node given as an IPv4 literal, the highest port.",
            QueryRecoveryServerResponse(VMID_B, "192.0.2.17", 65535, ExistingVM.EXISTING),
        ),
        (
            "deleted",
            "The replica was deleted by an administrator; port 1.",
            QueryRecoveryServerResponse(VMID, "n", 1, ExistingVM.DELETED),
        ),
    ],
    Error: [
        (
            "known_code",
            "A refusal with a known code and a text.",
            Error(ErrorCode.VM_NOT_HERE, "VM moved to node-2"),
        ),
        ("no_text", "A known code with an empty text.", Error(ErrorCode.BUSY)),
        (
            "unknown_future_code",
            "Code 900, unknown to this version: kept as a number (treat as INTERNAL).",
            Error(900, "from the future"),
        ),
        (
            "max_text",
            "A text of 1024 UTF-8 bytes (the limit), multi-byte characters.",
            Error(ErrorCode.INTERNAL, "\u00e9" * 512),
        ),
    ],
    Keepalive: [
        ("defaults", "Token 0.", Keepalive()),
        ("max_token", "Token 2**64-1.", Keepalive((1 << 64) - 1)),
        ("token", "An ordinary token.", Keepalive(0x0123456789ABCDEF)),
    ],
    RelationshipCreate: [
        (
            "minimal",
            "One disk, no configuration blob.",
            RelationshipCreate(VMID, "web-01", (DiskInfo("system", 1 << 20),)),
        ),
        (
            "rich",
            "A non-ASCII name, a configuration blob and three disks.",
            RelationshipCreate(
                VMID_B,
                UNICODE_NAME,
                (
                    DiskInfo("scsi0-0.vhdx", 40 << 30),
                    DiskInfo("_swap", 4 << 30),
                    DiskInfo("d", (1 << 63) - 1),
                ),
                config=b'{"cpus": 4, "memory_mb": 8192}\x00\xff',
            ),
        ),
    ],
    RelationshipOpen: [
        ("defaults", "Generation 0.", RelationshipOpen(VMID)),
        ("max_generation", "Generation 2**32-1.", RelationshipOpen(VMID_B, (1 << 32) - 1)),
    ],
    RelationshipAccepted: [
        (
            "defaults",
            "The class's defaults: generation 0 (which no relationship has, REP-24), IR not "
            "started.",
            RelationshipAccepted(VMID, CONTEXT_DISKS),
        ),
        (
            "new_relationship",
            "What a recovery server answers a RelationshipCreate for a new VM: generation 1 "
            "(REP-24), IR not started, resume point disk 0 offset 0 (REP-26).",
            RelationshipAccepted(VMID, CONTEXT_DISKS, generation=1),
        ),
        (
            "ir_in_progress",
            "An interrupted IR to resume on the second disk.",
            RelationshipAccepted(
                VMID_B,
                CONTEXT_DISKS,
                generation=3,
                ir_state=IRState.IN_PROGRESS,
                resume_disk=1,
                resume_offset=32768,
            ),
        ),
        (
            "complete",
            "IR complete, highest applied sequence, resume point past the last disk.",
            RelationshipAccepted(
                VMID,
                (DiskInfo("system", 1 << 40),),
                generation=(1 << 32) - 1,
                ir_state=IRState.COMPLETE,
                applied_sequence=(1 << 64) - 1,
                resume_disk=1,
                resume_offset=0,
            ),
        ),
    ],
    RelationshipDelete: [
        (
            "context",
            "Delete the relationship (and replica) of the context VM.",
            RelationshipDelete(VMID),
        ),
        ("other_vm", "Delete the relationship of a second VM.", RelationshipDelete(VMID_B)),
        (
            "version_nibble_0",
            "A VMID whose version nibble is 0: valid (only the variant bits are checked).",
            RelationshipDelete(VMID_VERSION_0),
        ),
    ],
    FailoverRequest: [
        (
            "no_reverse",
            "Take the context VM over at sequence 7; its state digest over 64 KiB blocks; "
            "no reverse replication.",
            FailoverRequest(VMID, 7, 65536, digest(b"state")),
        ),
        (
            "reverse",
            "The same, then replicate the VM back to port 7443 of the primary's address.",
            FailoverRequest(VMID_B, (1 << 64) - 1, 4 << 20, WRONG_DIGEST, reverse_port=7443),
        ),
    ],
    FailoverDone: [
        (
            "generation_2",
            "The VM runs at the recovery side from point 7, at generation 2.",
            FailoverDone(VMID, 2, 7),
        ),
        (
            "max",
            "The largest generation and sequence.",
            FailoverDone(VMID_B, (1 << 32) - 1, (1 << 64) - 1),
        ),
    ],
    FailoverAsk: [
        (
            "context",
            "A planned failover of the context VM is asked at the recovery side (FOV-12).",
            FailoverAsk(VMID),
        ),
        ("other_vm", "The same for a second VM.", FailoverAsk(VMID_B)),
    ],
    FailoverDecline: [
        (
            "no_stop_hook",
            "The primary declines: it has no stop hook configured.",
            FailoverDecline(VMID, "no stop hook is configured ([failover] stop_command)"),
        ),
        (
            "empty_reason",
            "A decline without a reason (the text may be empty).",
            FailoverDecline(VMID_B),
        ),
        (
            "utf8_reason",
            "A reason in UTF-8 beyond ASCII.",
            FailoverDecline(VMID, "le script d'arrêt a échoué"),
        ),
        (
            "max_reason",
            "A reason of 1024 bytes, the most a reason may have (FOV-17).",
            FailoverDecline(VMID, "x" * 1024),
        ),
    ],
    IRBegin: [
        ("defaults", "An IR from the start.", IRBegin(VMID)),
        (
            "resume",
            "An IR resumed at disk 1, offset 32768 (within the context disks).",
            IRBegin(VMID_B, sequence=5, start_disk=1, start_offset=32768, total_bytes=32768),
        ),
        (
            "nothing_left",
            "Resume point just past the last disk (start_disk equals the disk count).",
            IRBegin(VMID, sequence=(1 << 64) - 1, start_disk=2, total_bytes=0),
        ),
    ],
    IREnd: [
        (
            "empty",
            "No chunks: the aggregate digest of nothing.",
            IREnd(VMID, 0, 0, aggregate()),
        ),
        (
            "two_chunks",
            "After the first two Chunk vectors (plain, ZERO).",
            IREnd(VMID_B, 7, 2, aggregate(CHUNKS[0].digest, CHUNKS[1].digest)),
        ),
    ],
    BatchBegin: [
        ("minimal", "Sequence 1 on base 0, no chunks.", BatchBegin(VMID, 1, 0, 0)),
        (
            "max",
            "The highest sequence, 2**32-1 chunks, a capture time.",
            BatchBegin(
                VMID_B,
                (1 << 64) - 1,
                (1 << 64) - 2,
                (1 << 32) - 1,
                total_bytes=(1 << 64) - 1,
                captured_at_ms=1767225600000,
            ),
        ),
    ],
    Chunk: [
        ("plain", "64 bytes of data on disk 0 at offset 0, uncompressed.", CHUNKS[0]),
        ("zero", "4096 zero bytes on disk 1 at offset 4096, as a ZERO chunk.", CHUNKS[1]),
        ("end_of_disk", "The last 16 bytes of disk 1 (64 KiB), uncompressed.", CHUNKS[2]),
    ],
    BatchEnd: [
        ("empty", "A batch of no chunks.", BatchEnd(VMID, 1, 0, aggregate())),
        (
            "three_chunks",
            "After the three Chunk vectors.",
            BatchEnd(VMID_B, 42, 3, aggregate(*(c.digest for c in CHUNKS))),
        ),
    ],
    Ack: [
        ("ir_complete", "The IR of sequence 0 is complete.", Ack(VMID, AckKind.IR_COMPLETE, 0)),
        (
            "batch_applied",
            "Batch 42 is applied.",
            Ack(VMID_B, AckKind.BATCH_APPLIED, 42),
        ),
        (
            "relationship_deleted",
            "The replica is removed and the relationship closed (answers RelationshipDelete).",
            Ack(VMID, AckKind.RELATIONSHIP_DELETED, 0),
        ),
    ],
    DigestMapRequest: [
        ("minimal", "One 4 KiB block.", DigestMapRequest(VMID, 0, 4096, 0, 1)),
        (
            "max",
            "The most blocks (65536) of the largest block size, disk 1.",
            DigestMapRequest(VMID_B, 1, 4 << 20, 8192, 65536),
        ),
    ],
    DigestMap: [
        ("one_block", "One digest.", DigestMap(VMID, 0, 4096, 0, digest(bytes(4096)))),
        (
            "four_blocks",
            "Four digests of 64 KiB blocks.",
            DigestMap(
                VMID_B,
                0,
                1 << 16,
                1 << 16,
                b"".join(digest(bytes([i]) * 16) for i in range(4)),
            ),
        ),
    ],
}

# -- Error vectors ---------------------------------------------------------------------------


def recv(message: Message) -> PreludeStep:
    return PreludeStep.of("recv", message)


def send(message: Message) -> PreludeStep:
    return PreludeStep.of("send", message)


def r_ready(recovery_type: RecoveryType = RecoveryType.STANDALONE) -> list[PreludeStep]:
    """A recovery server after negotiation (READY)."""
    return handshake(R, recovery_type)


def r_session(compression: Compression = Compression.NONE) -> list[PreludeStep]:
    """A recovery server with the relationship of VMID open (SESSION), ``compression``
    negotiated."""
    return open_session(R, compression=compression)


def r_batch(
    chunk_count: int = 1, *chunks: Chunk, compression: Compression = Compression.NONE
) -> list[PreludeStep]:
    """A recovery server inside batch 2 (base 1) of ``chunk_count`` chunks, some received
    (a compressed chunk needs its ``compression`` negotiated, CHK-24)."""
    begin = BatchBegin(VMID, 2, 1, chunk_count)
    return [*r_session(compression), recv(begin), *(recv(c) for c in chunks)]


def r_ir(*chunks: Chunk) -> list[PreludeStep]:
    """A recovery server inside IR 3, some chunks received."""
    return [*r_session(), recv(IRBegin(VMID, sequence=3)), *(recv(c) for c in chunks)]


def p_session() -> list[PreludeStep]:
    """A primary with the relationship of VMID open (SESSION)."""
    return open_session(P)


def p_ir_ending() -> list[PreludeStep]:
    """A primary that sent an empty IR 3 and its IREnd (waiting for the Ack)."""
    return [*p_session(), send(IRBegin(VMID, sequence=3)), send(IREnd(VMID, 3, 0, aggregate()))]


def p_deleting() -> list[PreludeStep]:
    """A primary that sent a RelationshipDelete for VMID (waiting for the Ack)."""
    return [*p_session(), send(RelationshipDelete(VMID))]


def p_failing_over() -> list[PreludeStep]:
    """A primary that asked for the failover of VMID at sequence 7 (waiting for the answer)."""
    return [*p_session(), send(FailoverRequest(VMID, 7, 4096, WRONG_DIGEST))]


def r_asked() -> list[PreludeStep]:
    """A recovery side that asked for the planned failover of VMID while accepting its
    open (SESSION)."""
    return [
        *handshake(R),
        recv(RelationshipOpen(VMID, generation=1)),
        send(FailoverAsk(VMID)),
        send(RelationshipAccepted(VMID, CONTEXT_DISKS, generation=1)),
    ]


def p_digests() -> list[PreludeStep]:
    """A primary waiting for the DigestMap of 4 blocks of 4 KiB on disk 0."""
    return [*p_session(), send(DigestMapRequest(VMID, 0, 4096, 0, 4))]


PLAIN_CHUNK = chunk_frame(0, 0, len(PLAIN_DATA), digest(PLAIN_DATA), PLAIN_DATA)
NEGOTIATE = frame(T.NEGOTIATE_REQUEST, negotiate_request_body())
KEEPALIVE = frame(T.KEEPALIVE, u64(1))


def ec(
    name: str,
    description: str,
    receiver: Role,
    prelude: Sequence[PreludeStep],
    data: bytes,
    *,
    eof: bool = False,
    events: int = 0,
) -> ErrorCase:
    return ErrorCase(name, description, receiver, tuple(prelude), data.hex(), eof, events)


def create_with_name(name: bytes) -> bytes:
    return frame(T.RELATIONSHIP_CREATE, relationship_create_body(name=name))


ERROR_SPECS: dict[type[RemoteProtocolError], list[ErrorCase]] = {
    frproto.MalformedMessage: [
        ec(
            "chunk_length_zero",
            "A chunk whose uncompressed length is 0.",
            R,
            r_batch(),
            chunk_frame(0, 0, 0, digest(b"")),
        ),
        ec(
            "plain_payload_short",
            "An uncompressed chunk of length 64 carrying 63 bytes.",
            R,
            r_batch(),
            chunk_frame(0, 0, 64, digest(PLAIN_DATA), PLAIN_DATA[:63]),
        ),
        ec(
            "plain_payload_long",
            "An uncompressed chunk of length 63 carrying 64 bytes.",
            R,
            r_batch(),
            chunk_frame(0, 0, 63, digest(PLAIN_DATA[:63]), PLAIN_DATA),
        ),
        ec(
            "zero_chunk_with_payload",
            "A ZERO chunk that carries a payload.",
            R,
            r_batch(),
            chunk_frame(0, 0, 16, frproto.codec.zero_digest(16), bytes(16), ChunkFlags.ZERO),
        ),
        ec(
            "compressed_payload_empty",
            "A zstd chunk with an empty payload.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 128, digest(b"A" * 128), b"", ChunkFlags.ZSTD),
        ),
        ec(
            "compressed_payload_longer_than_length",
            "An LZ4 chunk whose payload (11 bytes) is longer than its length (8).",
            R,
            r_batch(compression=Compression.LZ4),
            chunk_frame(0, 0, 8, digest(b"A" * 8), LZ4_A64, ChunkFlags.LZ4),
        ),
    ],
    frproto.TruncatedFrame: [
        ec(
            "envelope_at_eof",
            "The stream ends after 4 bytes of an envelope.",
            R,
            [],
            NEGOTIATE[:4],
            eof=True,
        ),
        ec(
            "body_at_eof",
            "The stream ends 3 bytes into a 7-byte NegotiateRequest body.",
            R,
            [],
            NEGOTIATE[:11],
            eof=True,
        ),
        ec(
            "after_a_good_frame",
            "A whole NegotiateRequest, then 3 bytes of an envelope and the end of the stream.",
            R,
            [],
            NEGOTIATE + KEEPALIVE[:3],
            eof=True,
            events=1,
        ),
        ec(
            "body_shorter_than_schema",
            "A NegotiateRequest frame whose body is 5 bytes; the message needs 7.",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body()[:5]),
        ),
        ec(
            "text_past_body",
            "An Error whose text length (200) runs past the end of its body.",
            R,
            [],
            frame(T.ERROR, u16(ErrorCode.INTERNAL) + u16(200) + b"short"),
        ),
        ec(
            "array_past_body",
            "A QueryRecoveryServer that counts 3 disk sizes and carries 2.",
            R,
            r_ready(RecoveryType.CLUSTERING_BROKER),
            frame(T.QUERY_RECOVERY_SERVER, query_body(VMID.bytes, b"vm", (1, 2), count=3)),
        ),
        ec(
            "chunk_body_shorter_than_header",
            "A Chunk frame whose body (16 bytes) is shorter than the 32-byte chunk header.",
            R,
            r_batch(),
            envelope(T.CHUNK, 16) + PLAIN_CHUNK[8:24],
        ),
        ec(
            "relationship_delete_short",
            "A RelationshipDelete whose body is 15 bytes; the VMID needs 16.",
            R,
            r_session(),
            frame(T.RELATIONSHIP_DELETE, VMID.bytes[:15]),
        ),
    ],
    frproto.FrameTooLarge: [
        ec(
            "control_over_limit",
            "A NegotiateRequest envelope declaring MAX_CONTROL_BODY + 1 bytes: refused at once.",
            R,
            [],
            envelope(T.NEGOTIATE_REQUEST, MAX_CONTROL_BODY + 1),
        ),
        ec(
            "chunk_over_limit",
            "A Chunk envelope declaring the chunk header + MAX_CHUNK_DATA + 1 bytes.",
            R,
            r_batch(),
            envelope(T.CHUNK, 32 + MAX_CHUNK_DATA + 1),
        ),
        ec(
            "length_all_ones",
            "A Keepalive envelope declaring 2**32-1 bytes.",
            R,
            r_ready(),
            envelope(T.KEEPALIVE, 0xFFFFFFFF),
        ),
        ec(
            "ignorable_tag_over_limit",
            "An ignorable unknown tag (0x8001) declaring MAX_CONTROL_BODY + 1 bytes.",
            R,
            r_ready(),
            envelope(0x8001, MAX_CONTROL_BODY + 1),
        ),
        ec(
            "chunk_length_over_limit",
            "A ZERO chunk whose header declares MAX_CHUNK_DATA + 1 bytes.",
            R,
            r_batch(),
            chunk_frame(0, 0, MAX_CHUNK_DATA + 1, WRONG_DIGEST, b"", ChunkFlags.ZERO),
        ),
    ],
    frproto.UnknownTag: [
        ec(
            "critical_unknown_first",
            "Critical tag 0x0007 (unknown) as the first frame, empty body.",
            R,
            [],
            envelope(0x0007, 0),
        ),
        ec(
            "critical_unknown_with_body",
            "Critical tag 0x7fff with a 4-byte body, after negotiation.",
            R,
            r_ready(),
            frame(0x7FFF, b"\x00\x01\x02\x03"),
        ),
        ec(
            "after_ignorable_unknown",
            "An ignorable unknown tag 0x8007 (an UnknownMessage event), then critical 0x0050.",
            R,
            r_ready(),
            frame(0x8007, b"skip me") + frame(0x0050, b""),
            events=1,
        ),
        ec(
            "to_primary",
            "Critical tag 0x0100 sent to a primary waiting for a NegotiateResponse.",
            P,
            [send(NegotiateRequest())],
            frame(0x0100, b"\x00"),
        ),
    ],
    frproto.BadValue: [
        ec(
            "failover_decline_long_reason",
            "A FailoverDecline whose reason is 1025 bytes, over the limit (FOV-17): refused "
            "as it is decoded, before what it answers is looked at.",
            R,
            r_session(),
            frame(T.FAILOVER_DECLINE, VMID.bytes + u16(1025) + b"x" * 1025),
        ),
        ec(
            "negotiated_compression_not_offered",
            "A compatible NegotiateResponse choosing LZ4 when the primary offered only ZSTD.",
            P,
            [send(NegotiateRequest(compression=CompressionSet.ZSTD))],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(compression=2)),
        ),
        ec(
            "negotiated_major_differs",
            "A NegotiateResponse marking version 2.0 compatible with an offer of 1.1.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(version=(2, 0))),
        ),
        ec(
            "negotiated_minor_above_offer",
            "A NegotiateResponse choosing minor version 5 when 1.1 was offered.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(version=(1, 5))),
        ),
        ec(
            "negotiated_encryption_not_offered",
            "A NegotiateResponse choosing encryption NONE when only TLS13 was offered.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(encryption=0)),
        ),
        ec(
            "negotiated_auth_type_differs",
            "A NegotiateResponse with auth type INTEGRATED to a CERTIFICATE request.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(auth=1)),
        ),
        ec(
            "recovery_type_9",
            "A NegotiateResponse with recovery_type 9.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(recovery_type=9)),
        ),
        ec(
            "verdict_0",
            "A NegotiateResponse with verdict 0.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(verdict=0)),
        ),
        ec(
            "compression_unknown_bit",
            "A NegotiateRequest offering compression bit 0x0004 (unknown).",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body(compression=0x0007)),
        ),
        ec(
            "encryption_unknown_bit",
            "A NegotiateRequest offering encryption bit 0x8000 (unknown).",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body(encryption=0x8002)),
        ),
        ec(
            "auth_type_0",
            "A NegotiateRequest with auth_type 0.",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body(auth=0)),
        ),
        ec(
            "chunk_unknown_flag",
            "A chunk with flag bit 0x0008 (unknown).",
            R,
            r_batch(),
            chunk_frame(0, 0, 64, digest(PLAIN_DATA), PLAIN_DATA, flags=0x0008),
        ),
        ec(
            "chunk_exclusive_flags",
            "A chunk with both ZSTD and LZ4 set.",
            R,
            r_batch(),
            chunk_frame(0, 0, 128, digest(b"A" * 128), ZSTD_A128, ChunkFlags.ZSTD | ChunkFlags.LZ4),
        ),
        ec(
            "chunk_zstd_not_negotiated",
            "A valid zstd chunk (128 x 'A') on a connection that negotiated LZ4.",
            R,
            r_batch(compression=Compression.LZ4),
            chunk_frame(0, 0, 128, digest(b"A" * 128), ZSTD_A128, ChunkFlags.ZSTD),
        ),
        ec(
            "chunk_lz4_not_negotiated",
            "A valid LZ4 chunk (64 x 'A') on a connection that negotiated zstd.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 64, digest(b"A" * 64), LZ4_A64, ChunkFlags.LZ4),
        ),
        ec(
            "chunk_compressed_none_negotiated",
            "A valid zstd chunk (128 x 'A') on a connection that negotiated no compression.",
            R,
            r_batch(),
            chunk_frame(0, 0, 128, digest(b"A" * 128), ZSTD_A128, ChunkFlags.ZSTD),
        ),
        ec(
            "error_code_0",
            "An Error carrying code OK (0).",
            R,
            [],
            frame(T.ERROR, u16(0) + text16(b"fine")),
        ),
        ec(
            "error_text_too_long",
            "An Error whose text is 1025 bytes (limit 1024).",
            R,
            [],
            frame(T.ERROR, u16(ErrorCode.INTERNAL) + text16(b"x" * 1025)),
        ),
        ec(
            "batch_sequence_not_after_base",
            "A BatchBegin whose sequence (5) is not after its base (5).",
            R,
            r_session(),
            frame(T.BATCH_BEGIN, VMID.bytes + u64(5) + u64(5) + u32(0) + u64(0) + u64(0)),
        ),
        ec(
            "relationship_without_disks",
            "A RelationshipCreate with no disks.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_CREATE, relationship_create_body(disks=())),
        ),
        ec(
            "duplicate_disk_id",
            "A RelationshipCreate naming the same disk twice.",
            R,
            r_ready(),
            frame(
                T.RELATIONSHIP_CREATE,
                relationship_create_body(disks=((b"sys", 4096), (b"sys", 8192))),
            ),
        ),
        ec(
            "ack_kind_7",
            "An Ack of kind 7, to a primary waiting for the Ack of its IR.",
            P,
            p_ir_ending(),
            frame(T.ACK, VMID.bytes + u8(7) + u64(3)),
        ),
        ec(
            "block_size_too_small",
            "A DigestMapRequest with block size 1000 (minimum 4096).",
            R,
            r_session(),
            frame(T.DIGEST_MAP_REQUEST, VMID.bytes + u16(0) + u32(1000) + u64(0) + u32(1)),
        ),
        ec(
            "port_0",
            "A QueryRecoveryServerResponse with port 0.",
            P,
            [*handshake(P, RecoveryType.CLUSTERING_BROKER), send(QueryRecoveryServer(VMID, "vm"))],
            frame(T.QUERY_RECOVERY_SERVER_RESPONSE, VMID.bytes + u8(1) + u16(0) + text8(b"node1")),
        ),
    ],
    frproto.TrailingBytes: [
        ec(
            "negotiate_request",
            "A NegotiateRequest body with one byte after the message.",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body() + b"\x00"),
        ),
        ec(
            "keepalive",
            "A Keepalive body of 9 bytes (the message is 8).",
            R,
            r_ready(),
            frame(T.KEEPALIVE, u64(1) + b"\xff"),
        ),
        ec(
            "relationship_open",
            "A RelationshipOpen with 4 bytes after the message.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_OPEN, relationship_open_body(VMID.bytes) + b"\x00" * 4),
        ),
        ec(
            "relationship_delete",
            "A RelationshipDelete body of 17 bytes (the message is 16).",
            R,
            r_session(),
            frame(T.RELATIONSHIP_DELETE, VMID.bytes + b"\x00"),
        ),
    ],
    frproto.DigestMismatch: [
        ec(
            "chunk_digest_wrong",
            "An uncompressed chunk whose digest does not match its data.",
            R,
            r_batch(),
            chunk_frame(0, 0, 64, WRONG_DIGEST, PLAIN_DATA),
        ),
        ec(
            "zero_chunk_digest_wrong",
            "A ZERO chunk whose digest is not the digest of zeros.",
            R,
            r_batch(),
            chunk_frame(0, 0, 4096, WRONG_DIGEST, b"", ChunkFlags.ZERO),
        ),
        ec(
            "compressed_chunk_digest_wrong",
            "A valid zstd chunk (128 x 'A') whose digest does not match the data.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 128, WRONG_DIGEST, ZSTD_A128, ChunkFlags.ZSTD),
        ),
        ec(
            "batch_aggregate_wrong",
            "A BatchEnd with the right count and a wrong aggregate digest.",
            R,
            r_batch(1, CHUNKS[0]),
            frame(T.BATCH_END, end_body(VMID.bytes, 2, 1, WRONG_DIGEST)),
        ),
        ec(
            "ir_aggregate_wrong",
            "An IREnd with the right count and a wrong aggregate digest.",
            R,
            r_ir(CHUNKS[0], CHUNKS[1]),
            frame(T.IR_END, end_body(VMID.bytes, 3, 2, aggregate(CHUNKS[1].digest))),
        ),
    ],
    frproto.BadVMID: [
        ec(
            "nil",
            "A RelationshipOpen for the nil GUID.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_OPEN, relationship_open_body(bytes(16))),
        ),
        ec(
            "max",
            "A RelationshipCreate for the all-ones GUID.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_CREATE, relationship_create_body(vmid=b"\xff" * 16)),
        ),
        ec(
            "ncs_variant",
            "A RelationshipOpen for a GUID of the NCS variant (byte 8 = 0x0e).",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_OPEN, relationship_open_body(VMID_NCS.bytes)),
        ),
        ec(
            "microsoft_variant",
            "A QueryRecoveryServer for a GUID of the Microsoft variant (byte 8 = 0xce).",
            R,
            r_ready(RecoveryType.CLUSTERING_BROKER),
            frame(T.QUERY_RECOVERY_SERVER, query_body(VMID_MICROSOFT.bytes, b"vm")),
        ),
        ec(
            "relationship_delete_nil",
            "A RelationshipDelete for the nil GUID, in an open relationship.",
            R,
            r_session(),
            frame(T.RELATIONSHIP_DELETE, bytes(16)),
        ),
        ec(
            "relationship_delete_max",
            "A RelationshipDelete for the all-ones GUID, in an open relationship.",
            R,
            r_session(),
            frame(T.RELATIONSHIP_DELETE, b"\xff" * 16),
        ),
        ec(
            "ack_nil",
            "An Ack for the nil GUID, to a primary waiting for it.",
            P,
            p_ir_ending(),
            frame(T.ACK, bytes(16) + u8(AckKind.IR_COMPLETE) + u64(3)),
        ),
    ],
    frproto.BadName: [
        ec(
            "server_name_ipv6_zone_nul",
            "A NegotiateResponse whose server name is an IPv6 literal with a zone id holding NUL.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(server_name=b"fe80::1%\0")),
        ),
        ec("vm_name_slash", "A VM name with '/'.", R, r_ready(), create_with_name(b"web/01")),
        ec(
            "vm_name_backslash",
            "A VM name with '\\'.",
            R,
            r_ready(),
            create_with_name(b"web\\01"),
        ),
        ec("vm_name_nul", "A VM name with a NUL.", R, r_ready(), create_with_name(b"web\x0001")),
        ec("vm_name_dotdot", "The VM name '..'.", R, r_ready(), create_with_name(b"..")),
        ec("vm_name_dot", "The VM name '.'.", R, r_ready(), create_with_name(b".")),
        ec(
            "vm_name_invalid_utf8",
            "A VM name that is not valid UTF-8.",
            R,
            r_ready(),
            create_with_name(b"web-\xff\xfe"),
        ),
        ec("vm_name_empty", "An empty VM name.", R, r_ready(), create_with_name(b"")),
        ec(
            "vm_name_too_long",
            "A VM name of 256 bytes (limit 255).",
            R,
            r_ready(),
            create_with_name(b"v" * 256),
        ),
        ec(
            "vm_name_control_char",
            "A VM name with a control character (BEL).",
            R,
            r_ready(),
            create_with_name(b"web\x07"),
        ),
        ec(
            "query_vm_name_slash",
            "A QueryRecoveryServer to a broker with '/' in the VM name.",
            R,
            r_ready(RecoveryType.CLUSTERING_BROKER),
            frame(T.QUERY_RECOVERY_SERVER, query_body(VMID.bytes, b"../etc")),
        ),
        ec(
            "disk_id_slash",
            "A RelationshipCreate with a disk id holding '/'.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_CREATE, relationship_create_body(disks=((b"disk/0", 4096),))),
        ),
        ec(
            "disk_id_leading_dot",
            "A RelationshipCreate with the disk id '.hidden'.",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_CREATE, relationship_create_body(disks=((b".hidden", 4096),))),
        ),
        ec(
            "accepted_disk_id_slash",
            "A RelationshipAccepted whose disk id holds '/', to the primary that asked.",
            P,
            [*handshake(P), send(RelationshipOpen(VMID, 1))],
            frame(
                T.RELATIONSHIP_ACCEPTED,
                VMID.bytes
                + u32(1)
                + u8(0)
                + u64(0)
                + u16(0)
                + u64(0)
                + disks_body(((b"a/b", 4096),)),
            ),
        ),
        ec(
            "server_name_invalid",
            "A NegotiateResponse whose server name is neither a DNS name nor an IP address.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(server_name=b"bad_name!")),
        ),
    ],
    frproto.UnexpectedMessage: [
        ec(
            "query_answer_for_another_vm",
            "A QueryRecoveryServerResponse about a VM other than the one asked for.",
            P,
            [*handshake(P, RecoveryType.CLUSTERING_BROKER), send(QueryRecoveryServer(VMID, "vm"))],
            frproto.codec.encode_frame(
                QueryRecoveryServerResponse(VMID_B, "r1.example.com", 7443, ExistingVM.NEW)
            ),
        ),
        ec(
            "query_before_negotiate",
            "A QueryRecoveryServer as the first frame.",
            R,
            [],
            frproto.codec.encode_frame(QueryRecoveryServer(VMID, "vm")),
        ),
        ec(
            "batch_begin_before_relationship",
            "A BatchBegin after negotiation, with no relationship open.",
            R,
            r_ready(),
            frproto.codec.encode_frame(BatchBegin(VMID, 2, 1, 0)),
        ),
        ec(
            "query_to_standalone",
            "A QueryRecoveryServer to a stand-alone recovery server.",
            R,
            r_ready(RecoveryType.STANDALONE),
            frproto.codec.encode_frame(QueryRecoveryServer(VMID, "vm")),
        ),
        ec(
            "query_to_cluster_node",
            "A QueryRecoveryServer to a cluster node.",
            R,
            r_ready(RecoveryType.CLUSTER_NODE),
            frproto.codec.encode_frame(QueryRecoveryServer(VMID, "vm")),
        ),
        ec(
            "relationship_create_to_broker",
            "A RelationshipCreate to a clustering broker.",
            R,
            r_ready(RecoveryType.CLUSTERING_BROKER),
            frproto.codec.encode_frame(RelationshipCreate(VMID, "web-01", CONTEXT_DISKS)),
        ),
        ec(
            "relationship_open_to_broker",
            "A RelationshipOpen to a clustering broker.",
            R,
            r_ready(RecoveryType.CLUSTERING_BROKER),
            frproto.codec.encode_frame(RelationshipOpen(VMID, 1)),
        ),
        ec(
            "second_negotiate",
            "A second NegotiateRequest after the negotiation.",
            R,
            r_ready(),
            NEGOTIATE,
        ),
        ec(
            "response_to_recovery",
            "A NegotiateResponse sent to the recovery side.",
            R,
            [],
            frproto.codec.encode_frame(NegotiateResponse()),
        ),
        ec(
            "keepalive_after_error",
            "An Error (which ends the conversation), then a Keepalive.",
            R,
            r_ready(),
            frproto.codec.encode_frame(Error(ErrorCode.INTERNAL, "bye")) + KEEPALIVE,
            events=1,
        ),
        ec(
            "ir_begin_other_vm",
            "An IRBegin for a VM other than the one whose relationship is open.",
            R,
            r_session(),
            frproto.codec.encode_frame(IRBegin(VMID_B)),
        ),
        ec(
            "batch_end_wrong_sequence",
            "A BatchEnd for sequence 3 in batch 2.",
            R,
            r_batch(0),
            frame(T.BATCH_END, end_body(VMID.bytes, 3, 0, aggregate())),
        ),
        ec(
            "ack_wrong_kind",
            "A BATCH_APPLIED Ack to a primary waiting for the Ack of its IR.",
            P,
            p_ir_ending(),
            frproto.codec.encode_frame(Ack(VMID, AckKind.BATCH_APPLIED, 3)),
        ),
        ec(
            "accepted_other_vm",
            "A RelationshipAccepted for a VM other than the one the primary asked for.",
            P,
            [*handshake(P), send(RelationshipOpen(VMID, 1))],
            frproto.codec.encode_frame(RelationshipAccepted(VMID_B, CONTEXT_DISKS)),
        ),
        ec(
            "digest_map_other_range",
            "A DigestMap for another offset than the one requested.",
            P,
            p_digests(),
            frproto.codec.encode_frame(DigestMap(VMID, 0, 4096, 4096, WRONG_DIGEST * 4)),
        ),
        ec(
            "relationship_delete_other_vm",
            "A RelationshipDelete for a VM other than the one whose relationship is open.",
            R,
            r_session(),
            frame(T.RELATIONSHIP_DELETE, VMID_B.bytes),
        ),
        ec(
            "relationship_delete_without_relationship",
            "A RelationshipDelete when no relationship is open (READY).",
            R,
            r_ready(),
            frame(T.RELATIONSHIP_DELETE, VMID.bytes),
        ),
        ec(
            "relationship_delete_in_batch",
            "A RelationshipDelete while a batch is in progress.",
            R,
            r_batch(),
            frame(T.RELATIONSHIP_DELETE, VMID.bytes),
        ),
        ec(
            "failover_request_other_vm",
            "A FailoverRequest for a VM other than the one whose relationship is open (FOV-1).",
            R,
            r_session(),
            frame(T.FAILOVER_REQUEST, VMID_B.bytes + u64(7) + u32(4096) + WRONG_DIGEST + u16(0)),
        ),
        ec(
            "failover_request_without_relationship",
            "A FailoverRequest when no relationship is open (READY).",
            R,
            r_ready(),
            frame(T.FAILOVER_REQUEST, VMID.bytes + u64(7) + u32(4096) + WRONG_DIGEST + u16(0)),
        ),
        ec(
            "failover_request_at_1_0",
            "A FailoverRequest (a 1.1 message) on a connection negotiated at 1.0 (NEG-14).",
            R,
            open_session(R, version=(1, 0)),
            frame(T.FAILOVER_REQUEST, VMID.bytes + u64(7) + u32(4096) + WRONG_DIGEST + u16(0)),
        ),
        ec(
            "failover_done_other_sequence",
            "A FailoverDone at sequence 8 to a primary that asked for sequence 7 (FOV-3).",
            P,
            p_failing_over(),
            frame(T.FAILOVER_DONE, VMID.bytes + u32(2) + u64(8)),
        ),
        ec(
            "failover_done_unasked",
            "A FailoverDone to a primary that asked for no failover (SESSION).",
            P,
            p_session(),
            frame(T.FAILOVER_DONE, VMID.bytes + u32(2) + u64(7)),
        ),
        ec(
            "failover_ask_other_vm",
            "A FailoverAsk for a VM other than the one the primary is opening (FOV-13).",
            P,
            [*handshake(P), send(RelationshipOpen(VMID, generation=1))],
            frame(T.FAILOVER_ASK, VMID_B.bytes),
        ),
        ec(
            "failover_ask_in_session",
            "A FailoverAsk once the relationship is open (SESSION): only in OPENING (FOV-12).",
            P,
            p_session(),
            frame(T.FAILOVER_ASK, VMID.bytes),
        ),
        ec(
            "failover_ask_at_1_0",
            "A FailoverAsk (a 1.1 message) on a connection negotiated at 1.0 (NEG-14).",
            P,
            [*handshake(P, version=(1, 0)), send(RelationshipOpen(VMID, generation=1))],
            frame(T.FAILOVER_ASK, VMID.bytes),
        ),
        ec(
            "failover_decline_unasked",
            "A FailoverDecline in a session where no FailoverAsk came (FOV-16).",
            R,
            r_session(),
            frame(T.FAILOVER_DECLINE, VMID.bytes + u16(0)),
        ),
        ec(
            "failover_decline_other_vm",
            "A FailoverDecline for a VM other than the asked one, whose relationship is open "
            "(FOV-16).",
            R,
            r_asked(),
            frame(T.FAILOVER_DECLINE, VMID_B.bytes + u16(0)),
        ),
        ec(
            "legacy_delete_at_1_1",
            "RelationshipDelete with its tag of before 1.1 (0x0013) on a connection at 1.1 "
            "(NEG-15).",
            R,
            r_session(),
            frame(0x0013, VMID.bytes),
        ),
        ec(
            "delete_at_1_0",
            "RelationshipDelete with its 1.1 tag (0x8013) on a connection at 1.0 (NEG-14).",
            R,
            open_session(R, version=(1, 0)),
            frame(T.RELATIONSHIP_DELETE, VMID.bytes),
        ),
        ec(
            "ack_wrong_kind_after_delete",
            "An IR_COMPLETE Ack to a primary waiting for the Ack of its RelationshipDelete.",
            P,
            p_deleting(),
            frame(T.ACK, VMID.bytes + u8(AckKind.IR_COMPLETE) + u64(0)),
        ),
        ec(
            "ack_deleted_with_sequence",
            "A RELATIONSHIP_DELETED Ack whose sequence is 1, not 0.",
            P,
            p_deleting(),
            frame(T.ACK, VMID.bytes + u8(AckKind.RELATIONSHIP_DELETED) + u64(1)),
        ),
        ec(
            "ack_deleted_after_ir",
            "A RELATIONSHIP_DELETED Ack to a primary waiting for the Ack of its IR.",
            P,
            p_ir_ending(),
            frame(T.ACK, VMID.bytes + u8(AckKind.RELATIONSHIP_DELETED) + u64(3)),
        ),
    ],
    frproto.ChunkOutOfRange: [
        ec(
            "no_such_disk",
            "A chunk for disk 2 of a VM with two disks.",
            R,
            r_batch(),
            chunk_frame(2, 0, 64, digest(PLAIN_DATA), PLAIN_DATA),
        ),
        ec(
            "past_end_of_disk",
            "A chunk running 1 byte past the end of disk 1 (64 KiB).",
            R,
            r_batch(),
            chunk_frame(1, (1 << 16) - 63, 64, digest(PLAIN_DATA), PLAIN_DATA),
        ),
        ec(
            "zero_chunk_past_end",
            "A ZERO chunk starting at the end of disk 1.",
            R,
            r_ir(),
            chunk_frame(1, 1 << 16, 4096, frproto.codec.zero_digest(4096), b"", ChunkFlags.ZERO),
        ),
        ec(
            "ir_begin_past_last_disk",
            "An IRBegin resuming at disk 3 of a VM with two disks.",
            R,
            r_session(),
            frproto.codec.encode_frame(IRBegin(VMID, start_disk=3)),
        ),
        ec(
            "ir_begin_past_end_of_disk",
            "An IRBegin resuming past the end of disk 1.",
            R,
            r_session(),
            frproto.codec.encode_frame(IRBegin(VMID, start_disk=1, start_offset=(1 << 16) + 1)),
        ),
        ec(
            "digest_map_request_no_such_disk",
            "A DigestMapRequest for disk 2 of a VM with two disks.",
            R,
            r_session(),
            frproto.codec.encode_frame(DigestMapRequest(VMID, 2, 4096, 0, 1)),
        ),
        ec(
            "digest_map_request_past_end",
            "A DigestMapRequest starting at the end of disk 1.",
            R,
            r_session(),
            frproto.codec.encode_frame(DigestMapRequest(VMID, 1, 4096, 1 << 16, 1)),
        ),
    ],
    frproto.BadCompressedData: [
        ec(
            "zstd_trailing_bytes",
            "A zstd frame of 128 bytes followed by two stray bytes, in a chunk of length 128.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 128, digest(b"A" * 128), ZSTD_A128 + b"\0\0", ChunkFlags.ZSTD),
        ),
        ec(
            "zstd_garbage",
            "A zstd chunk whose payload is not a zstd frame.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 64, digest(PLAIN_DATA), b"not a zstd frame", ChunkFlags.ZSTD),
        ),
        ec(
            "zstd_declares_more",
            "A zstd frame declaring 128 bytes of content in a chunk of length 64.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 64, digest(b"A" * 64), ZSTD_A128, ChunkFlags.ZSTD),
        ),
        ec(
            "zstd_declares_less",
            "A zstd frame declaring 128 bytes of content in a chunk of length 256.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 256, digest(b"A" * 256), ZSTD_A128, ChunkFlags.ZSTD),
        ),
        ec(
            "zstd_undeclared_short",
            "A zstd frame without a content size giving 64 bytes, in a chunk of length 128.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 128, digest(b"A" * 128), ZSTD_A64_NO_SIZE, ChunkFlags.ZSTD),
        ),
        ec(
            "zstd_undeclared_long",
            "A zstd frame without a content size giving 64 bytes, in a chunk of length 32.",
            R,
            r_batch(compression=Compression.ZSTD),
            chunk_frame(0, 0, 32, digest(b"A" * 32), ZSTD_A64_NO_SIZE, ChunkFlags.ZSTD),
        ),
        ec(
            "lz4_garbage",
            "An LZ4 chunk whose payload is not an LZ4 block.",
            R,
            r_batch(compression=Compression.LZ4),
            chunk_frame(0, 0, 64, digest(PLAIN_DATA), b"\xff" * 20, ChunkFlags.LZ4),
        ),
        ec(
            "lz4_short",
            "An LZ4 block of 64 bytes in a chunk of length 128.",
            R,
            r_batch(compression=Compression.LZ4),
            chunk_frame(0, 0, 128, digest(b"A" * 128), LZ4_A64, ChunkFlags.LZ4),
        ),
        ec(
            "lz4_long",
            "An LZ4 block of 64 bytes in a chunk of length 32.",
            R,
            r_batch(compression=Compression.LZ4),
            chunk_frame(0, 0, 32, digest(b"A" * 32), LZ4_A64, ChunkFlags.LZ4),
        ),
    ],
    frproto.ReservedNotZero: [
        ec(
            "first_frame",
            "A NegotiateRequest whose envelope reserved field is 0x0001.",
            R,
            [],
            frame(T.NEGOTIATE_REQUEST, negotiate_request_body(), reserved=0x0001),
        ),
        ec(
            "envelope_alone",
            "Only the envelope (reserved 0x8000) of a Keepalive: refused before the body.",
            R,
            r_ready(),
            envelope(T.KEEPALIVE, 8, reserved=0x8000),
        ),
        ec(
            "chunk",
            "A chunk frame whose envelope reserved field is 0x0100.",
            R,
            r_batch(),
            chunk_frame(0, 0, 64, digest(PLAIN_DATA), PLAIN_DATA, reserved=0x0100),
        ),
        ec(
            "after_a_good_frame",
            "A good Keepalive, then one with reserved 0xffff.",
            R,
            r_ready(),
            KEEPALIVE + frame(T.KEEPALIVE, u64(2), reserved=0xFFFF),
            events=1,
        ),
        ec(
            "to_primary",
            "A NegotiateResponse with reserved 0x0002, to the primary.",
            P,
            [send(NegotiateRequest())],
            frame(T.NEGOTIATE_RESPONSE, negotiate_response_body(), reserved=0x0002),
        ),
    ],
    frproto.CountMismatch: [
        ec(
            "more_chunks_than_declared",
            "A second chunk in a batch that declared one.",
            R,
            r_batch(1, CHUNKS[0]),
            frproto.codec.encode_frame(CHUNKS[1]),
        ),
        ec(
            "chunk_in_empty_batch",
            "A chunk in a batch that declared none.",
            R,
            r_batch(0),
            frproto.codec.encode_frame(CHUNKS[0]),
        ),
        ec(
            "batch_end_count_more",
            "A BatchEnd counting 2 chunks after 1 was sent.",
            R,
            r_batch(2, CHUNKS[0]),
            frame(T.BATCH_END, end_body(VMID.bytes, 2, 2, aggregate(CHUNKS[0].digest))),
        ),
        ec(
            "batch_end_fewer_than_declared",
            "A BatchEnd after 1 chunk (counting 1, right digest) of a batch that declared 2.",
            R,
            r_batch(2, CHUNKS[0]),
            frame(T.BATCH_END, end_body(VMID.bytes, 2, 1, aggregate(CHUNKS[0].digest))),
        ),
        ec(
            "ir_end_count",
            "An IREnd counting 1 chunk after 2 were sent.",
            R,
            r_ir(CHUNKS[0], CHUNKS[1]),
            frame(T.IR_END, end_body(VMID.bytes, 3, 1, aggregate(CHUNKS[0].digest))),
        ),
        ec(
            "digest_map_too_few",
            "A DigestMap with 3 digests for a request of 4 blocks.",
            P,
            p_digests(),
            frproto.codec.encode_frame(DigestMap(VMID, 0, 4096, 0, WRONG_DIGEST * 3)),
        ),
        ec(
            "digest_map_too_many",
            "A DigestMap with 5 digests for a request of 4 blocks.",
            P,
            p_digests(),
            frproto.codec.encode_frame(DigestMap(VMID, 0, 4096, 0, WRONG_DIGEST * 5)),
        ),
    ],
}

# -- Building, checking, writing -------------------------------------------------------------


class VectorInvalid(Exception):
    """A vector that frproto does not agree with."""


def build_message_vectors() -> list[MessageVectors]:
    """The message vector files, in tag order."""
    out = []
    for tag, cls in sorted(frproto.codec.MESSAGE_CLASSES.items()):
        cases = tuple(
            MessageCase(name, description, frproto.jsonable.message_to_dict(msg), _frame_hex(msg))
            for name, description, msg in MESSAGE_SPECS[cls]
        )
        out.append(MessageVectors(cls.__name__, int(tag), cases))
    return out


def _frame_hex(message: Message) -> str:
    return frproto.codec.encode_frame(message).hex()


def build_error_vectors() -> list[ErrorVectors]:
    """The error vector files, in code order."""
    out = []
    for cls, cases in sorted(ERROR_SPECS.items(), key=lambda item: item[0].code):
        out.append(ErrorVectors(cls.__name__, int(cls.code), cls.code.name, tuple(cases)))
    return out


def _dicts(message: object) -> object:
    return frproto.jsonable.message_to_dict(message) if isinstance(message, Message) else message


def verify_message_case(vectors: MessageVectors, case: MessageCase) -> None:
    """Raise VectorInvalid unless ``case`` round-trips and is accepted in context."""
    where = f"messages/{vectors.file_name} {case.name}"
    built = case.message()
    decoded = frproto.codec.decode_frame(case.frame)
    if _dicts(decoded) != case.fields or _dicts(built) != case.fields:
        raise VectorInvalid(f"{where}: fields do not round-trip")
    if frproto.codec.encode_frame(built) != case.frame:
        raise VectorInvalid(f"{where}: encode_frame differs from hex")
    if int(built.TAG) != vectors.tag or type(built).__name__ != vectors.message:
        raise VectorInvalid(f"{where}: wrong class or tag")
    receiver, prelude = message_context(built, CHUNKS)
    for byte_at_a_time in (False, True):
        conn = frproto.Connection(receiver)
        run_prelude(conn, prelude)
        result = feed(conn, case.frame, eof=False, byte_at_a_time=byte_at_a_time)
        if result.error is not None or [_dicts(e) for e in result.events] != [case.fields]:
            raise VectorInvalid(f"{where}: in context gave {result}")


def verify_error_case(vectors: ErrorVectors, case: ErrorCase) -> None:
    """Raise VectorInvalid unless ``case`` raises exactly its error class."""
    where = f"errors/{vectors.file_name} {case.name}"
    cls = vectors.error_class
    for byte_at_a_time in (False, True):
        _, result = run_error_case(case, byte_at_a_time=byte_at_a_time)
        if type(result.error) is not cls:
            raise VectorInvalid(f"{where}: raised {result.error!r}, not {cls.__name__}")
        if len(result.events) != case.events_before_error:
            raise VectorInvalid(f"{where}: {len(result.events)} events before the error")


def render() -> dict[str, str]:
    """Every vector file, checked: relative path -> text."""
    files: dict[str, str] = {}
    for mv in build_message_vectors():
        for mcase in mv.cases:
            verify_message_case(mv, mcase)
        files[f"{MESSAGES_SUBDIR}/{mv.file_name}"] = dump_json(mv.to_json())
    for ev in build_error_vectors():
        for ecase in ev.cases:
            verify_error_case(ev, ecase)
        files[f"{ERRORS_SUBDIR}/{ev.file_name}"] = dump_json(ev.to_json())
    return files


def _on_disk(directory: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for sub in (MESSAGES_SUBDIR, ERRORS_SUBDIR):
        for path in sorted((directory / sub).glob("*.json")):
            found[f"{sub}/{path.name}"] = path.read_text(encoding="utf-8")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files on disk differ from what would be written",
    )
    parser.add_argument(
        "--dir", type=Path, default=HERE, help="the vectors directory (default: this one)"
    )
    args = parser.parse_args(argv)
    directory: Path = args.dir
    try:
        files = render()
    except (VectorInvalid, AssertionError, RemoteProtocolError) as exc:
        print(f"invalid vector: {exc}", file=sys.stderr)
        return 2
    existing = _on_disk(directory)
    stale = sorted(set(existing) - set(files))
    changed = sorted(name for name, text in files.items() if existing.get(name) != text)
    if args.check:
        for name in changed:
            print(f"differs: {name}", file=sys.stderr)
        for name in stale:
            print(f"not generated: {name}", file=sys.stderr)
        return 1 if changed or stale else 0
    for name in stale:
        (directory / name).unlink()
    for name in changed:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[name], encoding="utf-8", newline="\n")
    total = sum(len(v.cases) for v in build_message_vectors())
    errors = sum(len(v.cases) for v in build_error_vectors())
    print(
        f"{len(files)} files ({total} message cases, {errors} error cases); "
        f"{len(changed)} written, {len(stale)} removed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

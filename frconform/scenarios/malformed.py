"""Malformed input and illegal order, from the golden vectors (``tests/vectors/errors``).

Each error case whose receiver is the recovery side becomes a scenario of its own (the
cases are independent: one failing must not hide the others). The case's prelude is
replayed live: its NegotiateRequest is sent as it is and the endpoint's own answer read;
a relationship in the prelude becomes a relationship created for a VM of this run, with
the prelude's disks (at the node a broker places it on); the other frames are sent with
the prelude's VMID replaced by the run's. Then the case's input is sent, and the endpoint
must answer with an Error carrying the case's code and close the connection.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.resources.abc import Traversable
from typing import Any, Final

import frproto as fp

from ..resources import vectors
from ..scenario import ANY_KIND, BROKER, REPLICATING, Context, not_applicable, scenario
from ..session import vm_name, where_to_replicate
from ..wire import Closed, HarnessError

#: The golden error vectors, as shipped with this package (``tests/vectors/errors``).
ERROR_VECTORS: Final = vectors("errors")

#: The requirement each error code's cases check, unless a case names its own below.
CODE_REQUIREMENT: Final[dict[str, str]] = {
    "RESERVED_NOT_ZERO": "ENV-2",
    "UNKNOWN_TAG": "ENV-3",
    "FRAME_TOO_LARGE": "ENV-4",
    "TRUNCATED": "ENC-2",
    "TRAILING_BYTES": "ENC-2",
    "BAD_VMID": "ENC-3",
    "BAD_NAME": "ENC-4",
    "BAD_VALUE": "ENC-7",
    "CHUNK_OUT_OF_RANGE": "CHK-14",
    "COUNT_MISMATCH": "SES-8",
    "DIGEST_MISMATCH": "CHK-12",
    "MALFORMED": "CHK-6",
    "BAD_COMPRESSED_DATA": "CHK-11",
    "UNEXPECTED_MESSAGE": "SM-1",
}
#: Cases that check a more specific requirement than their code's.
CASE_REQUIREMENT: Final[dict[str, str]] = {
    "TRUNCATED/chunk_body_shorter_than_header": "CHK-1",
    "BAD_NAME/vm_name_invalid_utf8": "ENC-1",
    "BAD_NAME/disk_id_slash": "ENC-5",
    "BAD_NAME/disk_id_leading_dot": "ENC-5",
    "BAD_VALUE/compression_unknown_bit": "MSG-1",
    "BAD_VALUE/encryption_unknown_bit": "MSG-2",
    "BAD_VALUE/auth_type_0": "MSG-3",
    "BAD_VALUE/chunk_unknown_flag": "CHK-2",
    "BAD_VALUE/chunk_exclusive_flags": "CHK-3",
    "BAD_VALUE/chunk_zstd_not_negotiated": "CHK-24",
    "BAD_VALUE/chunk_lz4_not_negotiated": "CHK-24",
    "BAD_VALUE/chunk_compressed_none_negotiated": "CHK-24",
    "BAD_VALUE/error_code_0": "MSG-16",
    "BAD_VALUE/error_text_too_long": "MSG-17",
    "BAD_VALUE/batch_sequence_not_after_base": "MSG-29",
    "BAD_VALUE/block_size_too_small": "MSG-32",
    "CHUNK_OUT_OF_RANGE/no_such_disk": "CHK-13",
    "CHUNK_OUT_OF_RANGE/ir_begin_past_last_disk": "SES-5",
    "CHUNK_OUT_OF_RANGE/ir_begin_past_end_of_disk": "SES-5",
    "CHUNK_OUT_OF_RANGE/digest_map_request_no_such_disk": "SES-11",
    "CHUNK_OUT_OF_RANGE/digest_map_request_past_end": "SES-11",
    "COUNT_MISMATCH/more_chunks_than_declared": "CHK-15",
    "COUNT_MISMATCH/chunk_in_empty_batch": "CHK-15",
    "DIGEST_MISMATCH/zero_chunk_digest_wrong": "CHK-8",
    "DIGEST_MISMATCH/batch_aggregate_wrong": "SES-9",
    "DIGEST_MISMATCH/ir_aggregate_wrong": "SES-9",
    "FRAME_TOO_LARGE/chunk_over_limit": "CHK-5",
    "FRAME_TOO_LARGE/chunk_length_over_limit": "CHK-5",
    "MALFORMED/chunk_length_zero": "CHK-4",
    "MALFORMED/zero_chunk_with_payload": "CHK-7",
    "MALFORMED/compressed_payload_empty": "CHK-9",
    "MALFORMED/compressed_payload_longer_than_length": "CHK-9",
    "BAD_COMPRESSED_DATA/zstd_declares_more": "CHK-10",
    "BAD_COMPRESSED_DATA/zstd_declares_less": "CHK-10",
    "TRUNCATED/envelope_at_eof": "ENV-5",
    "TRUNCATED/body_at_eof": "ENV-5",
    "TRUNCATED/after_a_good_frame": "ENV-5",
    "UNEXPECTED_MESSAGE/query_to_standalone": "SM-3",
    "UNEXPECTED_MESSAGE/query_to_cluster_node": "SM-3",
    "UNEXPECTED_MESSAGE/relationship_create_to_broker": "SM-4",
    "UNEXPECTED_MESSAGE/relationship_open_to_broker": "SM-4",
    "UNEXPECTED_MESSAGE/keepalive_after_error": "ERR-7",
    "UNEXPECTED_MESSAGE/ir_begin_other_vm": "SES-4",
    "UNEXPECTED_MESSAGE/batch_end_wrong_sequence": "SES-7",
    "UNEXPECTED_MESSAGE/relationship_delete_other_vm": "DEL-6",
    "UNEXPECTED_MESSAGE/failover_request_other_vm": "FOV-1",
    "UNEXPECTED_MESSAGE/failover_request_at_1_0": "NEG-14",
    "UNEXPECTED_MESSAGE/failover_decline_unasked": "FOV-16",
    "BAD_VALUE/failover_decline_long_reason": "FOV-17",
    "UNEXPECTED_MESSAGE/delete_at_1_0": "SM-9",
    "UNEXPECTED_MESSAGE/legacy_delete_at_1_1": "NEG-15",
    "UNKNOWN_TAG/after_ignorable_unknown": "ENV-7",
}
#: The endpoint must close the connection after a protocol violation's Error.
CLOSES: Final = "ERR-9"
OFFER: Final = {
    fp.Compression.NONE: fp.CompressionSet(0),
    fp.Compression.ZSTD: fp.CompressionSet.ZSTD,
    fp.Compression.LZ4: fp.CompressionSet.LZ4,
}
#: Tags of messages that only a recovery server (not a broker) takes.
_RELATIONSHIP_TAGS: Final = frozenset(
    {0x0010, 0x0011, 0x0012, 0x0013, 0x0020, 0x0021, 0x0030, 0x0031, 0x0032, 0x0033, 0x0040}
    | {0x8013, 0x8050, 0x8053}  # RelationshipDelete, FailoverRequest, FailoverDecline of 1.1
)
#: Messages an endpoint sends only when its operator asked for something (FailoverAsk:
#: a planned failover asked at the recovery side): a case whose prelude has the endpoint
#: send one cannot be replayed (docs/conformance.md lists what is not checked).
_NOT_REPLAYABLE: Final = frozenset({0x8052})


@dataclass(frozen=True)
class ErrorCase:
    """One case of ``tests/vectors/errors/*.json``."""

    code_name: str
    name: str
    description: str
    prelude: tuple[tuple[str, bytes], ...]
    input: bytes
    eof: bool
    #: How many messages of the input a receiver takes before the violation.
    events_before_error: int = 0

    @property
    def key(self) -> str:
        return f"{self.code_name}/{self.name}"

    @property
    def code(self) -> fp.ErrorCode:
        return fp.ErrorCode[self.code_name]


def load_cases(directory: Traversable = ERROR_VECTORS) -> Iterator[ErrorCase]:
    """The cases whose receiver is the recovery side, in file order."""
    files = (f for f in directory.iterdir() if f.name.endswith(".json"))
    for path in sorted(files, key=lambda f: f.name):
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        for case in doc["cases"]:
            if case["receiver"] != "recovery":
                continue  # a primary's duty: not what this harness tests
            steps = [(s["dir"], bytes.fromhex(s["hex"])) for s in case["prelude"]]
            if any(d == "send" and _tag(f) in _NOT_REPLAYABLE for d, f in steps):
                continue
            yield ErrorCase(
                doc["code_name"],
                case["name"],
                case["description"],
                tuple(steps),
                bytes.fromhex(case["input"]),
                bool(case["eof"]),
                int(case["events_before_error"]),
            )


def _tag_name(tag: int) -> str:
    try:
        return fp.MessageTag(tag).name
    except ValueError:
        return f"tag {tag:#06x}"


def _tag(frame: bytes) -> int:
    return int.from_bytes(frame[2:4], "big") if len(frame) >= 4 else -1


def _prelude_message(case: ErrorCase, tag: int) -> fp.Message | None:
    for _, frame in case.prelude:
        if _tag(frame) == tag:
            message = fp.codec.decode_frame(frame)
            assert isinstance(message, fp.Message)
            return message
    return None


def kinds_of(case: ErrorCase) -> frozenset[fp.RecoveryType]:
    """The kinds of endpoint the case applies to, from the prelude's NegotiateResponse
    (which names what the receiver was) and what the input asks for."""
    answer = _prelude_message(case, 0x0002)
    if _prelude_message(case, 0x0011) is not None or _prelude_message(case, 0x0010) is not None:
        return REPLICATING  # a relationship: a stand-alone server, or a broker's node
    if isinstance(answer, fp.NegotiateResponse):
        if answer.recovery_type == BROKER:
            return frozenset({BROKER})
        if _tag(case.input) == 0x0003:  # a query, where no broker is
            return frozenset({answer.recovery_type})
    return ANY_KIND


def requirement_of(case: ErrorCase) -> str:
    return CASE_REQUIREMENT.get(case.key) or CODE_REQUIREMENT[case.code_name]


def _register(case: ErrorCase) -> None:
    requirement = requirement_of(case)

    async def run(ctx: Context) -> None:
        await _replay(ctx, case, requirement)

    run.__doc__ = f"{case.code_name}: {case.description}"
    scenario(requirement, CLOSES, kinds=kinds_of(case), name=f"vector {case.key}")(run)


async def _replay(ctx: Context, case: ErrorCase, requirement: str) -> None:
    target = ctx.target
    ours = ctx.new_vmid()
    theirs: uuid.UUID | None = None
    opened = _prelude_message(case, 0x0011) or _prelude_message(case, 0x0010)
    accepted = _prelude_message(case, 0x0012)
    if opened is not None:
        assert isinstance(opened, (fp.RelationshipOpen, fp.RelationshipCreate))
        theirs = opened.vmid
        disks = accepted.disks if isinstance(accepted, fp.RelationshipAccepted) else ()
        if isinstance(opened, fp.RelationshipCreate):
            disks = opened.disks
        target = await where_to_replicate(ctx, ours, disks)
    elif (
        ctx.kind == BROKER and _tag(case.input) in _RELATIONSHIP_TAGS and not _is_broker_case(case)
    ):
        # A relationship message in READY: sent where relationships are taken.
        from ..session import place

        placed = await place(ctx, ctx.new_vmid())
        target = ctx.target.elsewhere(placed.server_name, placed.port)

    def ours_for_theirs(frame: bytes) -> bytes:
        return frame if theirs is None else frame.replace(theirs.bytes, ours.bytes)

    wanted = _prelude_message(case, 0x0002)
    compressed = None
    if isinstance(wanted, fp.NegotiateResponse) and (
        wanted.compression != fp.Compression.NONE or _is_compressed_chunk(case.input)
    ):
        # The compression the case negotiated: its chunks' own, or none at all for a
        # compressed chunk the connection must not take (CHK-24).
        compressed = wanted.compression
    # The end of the stream after the input is TLS's close_notify (a half-close: the
    # endpoint's Error can still come back).
    wire = await ctx.connect(target, half_close=case.eof)
    for direction, prelude_frame in case.prelude:
        frame, tag = prelude_frame, _tag(prelude_frame)
        if direction == "send":
            continue  # the endpoint's own answers were read after each request
        if tag in (0x0010, 0x0011):
            assert opened is not None
            create = fp.RelationshipCreate(ours, vm_name(ours), tuple(disks), b"frconform")
            await wire.send(create)
            answer = await wire.receive()
            if not isinstance(answer, fp.RelationshipAccepted):
                raise HarnessError(f"creating the case's VM was refused: {answer}")
            if ctx.kind != BROKER:
                ctx.remember(ours, target, tuple(disks))
            continue
        if tag == 0x0001 and compressed is not None:
            # Offer only the compression the case negotiated, so that the endpoint
            # chooses it whatever its own preference.
            request = fp.codec.decode_frame(frame)
            assert isinstance(request, fp.NegotiateRequest)
            frame = fp.codec.encode_frame(replace(request, compression=OFFER[compressed]))
        await wire.send_raw(ours_for_theirs(frame), f"prelude {_tag_name(tag)}")
        if tag == 0x0001:
            answer = await wire.receive()
            if not isinstance(answer, fp.NegotiateResponse) or answer.status != 0:
                raise HarnessError(f"the case's negotiation was refused: {answer}")
            if compressed is not None and answer.compression != compressed:
                why = (
                    f"the endpoint chose {answer.compression.name} compression; the case "
                    f"needs {compressed.name}"
                )
                ctx.checks.extend(not_applicable((requirement, CLOSES), ctx.scenario.name, why))
                return
    await wire.send_raw(ours_for_theirs(case.input), f"the case's input ({case.name})")
    if case.eof:
        await wire.send_eof()
    if _starts_with_an_error(case.input):
        # Our Error ended the conversation (MUST_CLOSE): the endpoint may send nothing
        # more, not even an Error about what followed it; it only closes.
        async with ctx.checking(requirement):
            got = await wire.receive()
            ctx.expect(isinstance(got, Closed), "the connection closed, nothing sent", got)
        async with ctx.checking(CLOSES):
            pass  # closed, checked above
        return
    async with ctx.checking(requirement):
        await ctx.expect_error(
            wire, case.code, closes=False, answers_first=case.events_before_error
        )
    async with ctx.checking(CLOSES):
        ctx.expect(await wire.closed_by_peer(), "the connection closed after the Error")


def _is_compressed_chunk(data: bytes) -> bool:
    """Whether ``data`` begins with a Chunk frame whose flags say ZSTD or LZ4."""
    if _tag(data) != 0x0031 or len(data) < 12:
        return False
    return bool(int.from_bytes(data[10:12], "big") & (fp.ChunkFlags.ZSTD | fp.ChunkFlags.LZ4))


def _starts_with_an_error(data: bytes) -> bool:
    """Whether ``data`` begins with a well-formed Error frame (sent by the harness)."""
    if _tag(data) != 0x0005 or len(data) < 8:
        return False
    size = 8 + int.from_bytes(data[4:8], "big")
    try:
        return isinstance(fp.codec.decode_frame(data[:size]), fp.Error)
    except fp.FrprotoError:
        return False


def _is_broker_case(case: ErrorCase) -> bool:
    answer = _prelude_message(case, 0x0002)
    return isinstance(answer, fp.NegotiateResponse) and answer.recovery_type == BROKER


for _case in load_cases():
    _register(_case)

__all__ = ["ErrorCase", "load_cases"]

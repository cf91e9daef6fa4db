"""Build (or check) the seed corpora of the three fuzz harnesses.

Sources:

* the golden vectors, ``tests/vectors/messages/*.json`` (every ``hex`` field) and
  ``tests/vectors/errors/*.json`` (every ``input`` field and ``prelude`` frame); any
  hex string found under those keys is used, whatever the nesting;
* when that directory does not exist (yet), frames of a few messages built here;
* a small hand-built set: one valid frame of every message type, chunk frames in every
  encoding (plain, ZERO, zstd, LZ4), some broken frames, and whole conversations for
  each connection scenario.

Usage (from the repository root)::

    .venv/bin/python -m fuzz.make_corpus            # rewrite fuzz/corpus/<harness>/
    .venv/bin/python -m fuzz.make_corpus --out DIR  # write DIR/<harness>/ instead
    .venv/bin/python -m fuzz.make_corpus --check    # run check() on the checked-in corpus

Files are named by the SHA-1 of their content (libFuzzer's convention) and each corpus
is capped (``--max``) so the checked-in set stays small.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import frproto
from frproto import (
    Ack,
    AckKind,
    BatchBegin,
    BatchEnd,
    Chunk,
    ChunkFlags,
    Compression,
    Connection,
    DigestMap,
    DigestMapRequest,
    Error,
    ErrorCode,
    ExistingVM,
    FailoverAsk,
    FailoverDecline,
    FailoverDone,
    FailoverRequest,
    IRBegin,
    IREnd,
    Keepalive,
    Message,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    QueryRecoveryServerResponse,
    RecoveryType,
    RelationshipAccepted,
    RelationshipCreate,
    RelationshipDelete,
    RelationshipOpen,
    Role,
)
from frproto.codec import AggregateDigest, chunk_digest, compress, encode_chunk_header, encode_frame

from . import fuzz_connection, fuzz_decoder, fuzz_fastpath
from .fuzz_connection import DISKS, VM_NAME, VMID, make_input

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
VECTORS = ROOT / "tests" / "vectors"
HARNESSES: dict[str, Callable[[bytes], None]] = {
    "decoder": fuzz_decoder.check,
    "connection": fuzz_connection.check,
    "fastpath": fuzz_fastpath.check,
}
_HEX_KEYS = frozenset({"hex", "input"})


# -- golden vectors ----------------------------------------------------------------------


def _hex_strings(node: Any, key: str | None = None) -> Iterator[tuple[str | None, bytes]]:
    """(direction, bytes) of every hex string under a ``hex``/``input`` key in ``node``."""
    if isinstance(node, dict):
        direction = node.get("dir") if isinstance(node.get("dir"), str) else None
        for k, v in node.items():
            if isinstance(v, str) and k in _HEX_KEYS:
                try:
                    yield direction, bytes.fromhex(v)
                except ValueError:
                    continue
            else:
                yield from _hex_strings(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _hex_strings(item, key)


def _received(direction: str | None) -> bool:
    """Whether a prelude frame travels towards the connection under test (best guess)."""
    return direction is None or not direction.lower().startswith(("send", "out", "tx"))


def vector_frames() -> tuple[list[bytes], list[tuple[str, bytes, bool]]]:
    """Single frames, and (receiver, received prelude + input, eof) of each error case."""
    frames: list[bytes] = []
    streams: list[tuple[str, bytes, bool]] = []
    for path in sorted((VECTORS / "messages").glob("*.json")):
        doc = json.loads(path.read_text())
        frames.extend(raw for _, raw in _hex_strings(doc))
    for path in sorted((VECTORS / "errors").glob("*.json")):
        doc = json.loads(path.read_text())
        cases = doc.get("cases", []) if isinstance(doc, dict) else []
        for case in cases if isinstance(cases, list) else []:
            found = list(_hex_strings(case))
            frames.extend(raw for _, raw in found)
            receiver = case.get("receiver", "recovery") if isinstance(case, dict) else "recovery"
            eof = bool(case.get("eof", True)) if isinstance(case, dict) else True
            if receiver == "primary":  # its prelude has sends we cannot replay: input only
                stream = bytes.fromhex(case["input"]) if "input" in case else b""
            else:
                stream = b"".join(raw for d, raw in found if _received(d))
            streams.append((str(receiver), stream, eof))
    return frames, streams


# -- hand-built frames ----------------------------------------------------------------------


def control_messages() -> list[Message]:
    """One valid message of every control type (and a few variants)."""
    agg = AggregateDigest()
    agg.add(chunk_digest(b"x" * 4096))
    return [
        NegotiateRequest(),
        NegotiateRequest(version=(2, 7)),
        NegotiateResponse(recovery_type=RecoveryType.STANDALONE, server_name="dr1.example"),
        NegotiateResponse(
            recovery_type=RecoveryType.CLUSTERING_BROKER,
            compression=Compression.ZSTD,
            server_name="192.0.2.10",
        ),
        QueryRecoveryServer(VMID, VM_NAME, tuple(d.size for d in DISKS)),
        QueryRecoveryServerResponse(VMID, "node1.example", 7400, ExistingVM.EXISTING),
        Error(int(ErrorCode.BUSY), "try later"),
        Error(int(ErrorCode.DIGEST_MISMATCH), "caf\u00e9"),
        Keepalive(0x0102030405060708),
        RelationshipCreate(VMID, VM_NAME, DISKS, config=b"<vm/>"),
        RelationshipOpen(VMID, 3),
        RelationshipAccepted(VMID, DISKS, resume_disk=1, resume_offset=4096),
        RelationshipDelete(VMID),
        IRBegin(VMID, 1, total_bytes=1 << 20),
        IREnd(VMID, 1, 1, agg.digest()),
        BatchBegin(VMID, 8, 7, 2, 8192, 1_700_000_000_000),
        BatchEnd(VMID, 8, 1, agg.digest()),
        Ack(VMID, AckKind.BATCH_APPLIED, 8),
        Ack(VMID, AckKind.RELATIONSHIP_DELETED, 0),
        DigestMapRequest(VMID, 0, 65536, 0, 4),
        DigestMap(VMID, 0, 65536, 0, bytes(range(64))),
        FailoverRequest(VMID, 8, 65536, bytes(range(16)), reverse_port=7443),
        FailoverDone(VMID, 2, 8),
        FailoverAsk(VMID),
        FailoverDecline(VMID, "no stop hook is configured"),
    ]


def chunk_frames(disk: int = 0, offset: int = 0) -> list[bytes]:
    """Chunk frames: plain, ZERO, zstd and LZ4 (each verifiable)."""
    text = b"frproto chunk " * 300
    data = text[:4096]
    digest = chunk_digest(data)
    out = [
        encode_frame(Chunk(disk, offset, 64, chunk_digest(bytes(range(64))), bytes(range(64)))),
        encode_frame(Chunk(disk, offset, 4096, digest, data)),
        encode_frame(Chunk(disk, offset, 4096, chunk_digest(bytes(4096)), b"", ChunkFlags.ZERO)),
    ]
    for kind, flag in ((Compression.ZSTD, ChunkFlags.ZSTD), (Compression.LZ4, ChunkFlags.LZ4)):
        packed = compress(data, kind)
        assert packed is not None
        out.append(encode_chunk_header(disk, offset, len(data), flag, digest, len(packed)) + packed)
    return out


def broken_frames() -> list[bytes]:
    """Frames that must be refused, one per error class (roughly)."""
    good = encode_frame(NegotiateRequest())
    return [
        b"",
        good[:5],
        good[:-1],
        good + b"\x00",
        b"\x00\x01" + good[2:],  # reserved not zero
        b"\x00\x00\x00\x7f\x00\x00\x00\x00",  # unknown critical tag
        b"\x00\x00\x80\x7f\x00\x00\x00\x03abc",  # ignorable unknown tag
        b"\x00\x00\x00\x31\xff\xff\xff\xff",  # chunk frame too large
        b"\x00\x00\x00\x05\x00\x00\x00\x05\x00\x64\x00\x01\xff",  # Error with bad UTF-8
    ]


def _batch_stream(count: int) -> bytes:
    frames = chunk_frames(0, 0)[:count]
    agg = AggregateDigest()
    for raw in frames:
        decoded = frproto.codec.decode_frame(raw)
        assert isinstance(decoded, Chunk)
        agg.add(decoded.digest)
    end = BatchEnd(VMID, 8, len(frames), agg.digest())
    return b"".join(frames) + encode_frame(end)


def _ir_stream() -> bytes:
    frames = [chunk_frames(0, 0)[1], chunk_frames(1, 4096)[2]]
    agg = AggregateDigest()
    for raw in frames:
        decoded = frproto.codec.decode_frame(raw)
        assert isinstance(decoded, Chunk)
        agg.add(decoded.digest)
    return b"".join(frames) + encode_frame(IREnd(VMID, 1, len(frames), agg.digest()))


def _recreate_after_delete() -> bytes:
    """After a delete: the same VM created again, then a keepalive (no renegotiation)."""
    return encode_frame(RelationshipCreate(VMID, VM_NAME, DISKS)) + encode_frame(Keepalive(2))


def connection_seeds() -> list[bytes]:
    """Whole conversations for each scenario of fuzz_connection."""
    negotiate = encode_frame(NegotiateRequest())
    create = encode_frame(RelationshipCreate(VMID, VM_NAME, DISKS))
    begin = encode_frame(BatchBegin(VMID, 8, 7, 4, 16384))
    keep = encode_frame(Keepalive(1))
    primary = Connection(Role.PRIMARY)
    primary.send(NegotiateRequest())
    seeds = [
        make_input("recovery-fresh", negotiate, split_seed=3),
        make_input(
            "recovery-fresh",
            negotiate + create + begin + _batch_stream(4),
            split_seed=7,
            respond=True,
        ),
        make_input("recovery-fresh", negotiate + keep, split_seed=0, eof=False),
        make_input("recovery-session", begin + _batch_stream(4), split_seed=11),
        make_input("recovery-session", encode_frame(DigestMapRequest(VMID, 1, 4096, 0, 4))),
        make_input(
            "recovery-session",
            encode_frame(DigestMapRequest(VMID, 0, 65536, 0, 64)),
            split_seed=2,
            respond=True,
        ),
        make_input(
            "recovery-session",
            encode_frame(RelationshipDelete(VMID)) + _recreate_after_delete(),
            split_seed=4,
            respond=True,
        ),
        make_input(
            "recovery-session",
            encode_frame(FailoverRequest(VMID, 8, 65536, bytes(16))) + keep,
            split_seed=15,
            respond=True,
        ),
        make_input(
            "primary-failing-over",
            encode_frame(FailoverDone(VMID, 2, 8)) + keep,
            split_seed=16,
        ),
        make_input(
            "primary-failing-over",
            encode_frame(Error(int(ErrorCode.OUT_OF_SEQUENCE), "differs")) + keep,
            split_seed=17,
        ),
        make_input(
            "primary-opening",
            encode_frame(FailoverAsk(VMID))
            + encode_frame(RelationshipAccepted(VMID, DISKS))
            + keep,
            split_seed=18,
        ),
        make_input(
            "recovery-asked",
            encode_frame(FailoverDecline(VMID, "the stop hook failed")) + keep,
            split_seed=19,
            respond=True,
        ),
        make_input(
            "recovery-asked",
            encode_frame(FailoverRequest(VMID, 8, 65536, bytes(16))) + keep,
            split_seed=20,
            respond=True,
        ),
        make_input("recovery-batch", _batch_stream(2), split_seed=0, eof=False),
        make_input("recovery-ir", _ir_stream(), split_seed=9, respond=True),
        make_input("recovery-broker", encode_frame(QueryRecoveryServer(VMID, VM_NAME))),
        make_input(
            "primary-negotiating",
            encode_frame(NegotiateResponse(server_name="dr1.example")),
            split_seed=6,
        ),
        make_input(
            "primary-opening",
            encode_frame(RelationshipAccepted(VMID, DISKS)) + keep,
            split_seed=8,
        ),
        make_input(
            "primary-digests",
            encode_frame(DigestMap(VMID, 0, 65536, 0, bytes(16 * 8))),
            split_seed=10,
        ),
        make_input(
            "primary-batch-ending",
            encode_frame(Ack(VMID, AckKind.BATCH_APPLIED, 8)) + keep,
            split_seed=12,
        ),
        make_input(
            "primary-querying",
            encode_frame(QueryRecoveryServerResponse(VMID, "node1.example", 7400, ExistingVM.NEW)),
            split_seed=13,
        ),
        make_input("primary-fresh", encode_frame(Error(int(ErrorCode.BUSY), "no"))),
        make_input(
            "primary-deleting",
            encode_frame(Ack(VMID, AckKind.RELATIONSHIP_DELETED, 0)) + keep,
            split_seed=14,
        ),
        make_input(
            "primary-deleting",
            encode_frame(Error(int(ErrorCode.INTERNAL), "could not remove")) + keep,
            split_seed=15,
        ),
    ]
    return seeds


# -- corpus assembly --------------------------------------------------------------------------


def _dedupe(head: Iterable[bytes], rest: Iterable[bytes], limit: int) -> list[bytes]:
    """``head`` (all kept) then ``rest`` spread evenly, without duplicates, at most ``limit``."""
    kept = list(dict.fromkeys(head))[:limit]
    others = [item for item in dict.fromkeys(rest) if item not in set(kept)]
    room = limit - len(kept)
    if len(others) > room:
        step = len(others) / room if room else 0
        others = [others[int(i * step)] for i in range(room)]
    return kept + others


def build(limit: int) -> dict[str, list[bytes]]:
    """The seeds of each harness."""
    frames, streams = vector_frames()
    own = [encode_frame(m) for m in control_messages()] + chunk_frames() + broken_frames()
    single = frames + own if frames else own
    # Vectors are long lists of similar frames; hand-built ones go first so they are kept.
    decoder = _dedupe(own, frames, limit)
    # Error cases: a recovery receiver replays the received prelude with the stand-alone
    # auto-responder answering (as the vector's "send" frames do); a primary receiver gets
    # the input in each primary scenario in turn. Then lone frames, in every scenario.
    primary_scenarios = [n for n, role, _ in fuzz_connection.SCENARIOS if role is Role.PRIMARY]
    connection_from_vectors: list[bytes] = []
    for i, (receiver, stream, eof) in enumerate(streams):
        if receiver == "primary":
            scenario = primary_scenarios[i % len(primary_scenarios)]
            seed = make_input(scenario, stream, split_seed=i, eof=eof)
        else:
            seed = make_input("recovery-fresh", stream, split_seed=i, eof=eof, respond=True)
        connection_from_vectors.append(seed)
    for i, frame in enumerate(frames):
        scenario = fuzz_connection.SCENARIOS[i % len(fuzz_connection.SCENARIOS)][0]
        connection_from_vectors.append(make_input(scenario, frame, split_seed=i))
    connection = _dedupe(connection_seeds(), connection_from_vectors, limit)
    headers = [raw[:40] for raw in single if len(raw) >= 8]
    fastpath = _dedupe((raw for raw in headers if len(raw) == 40), headers, limit // 2)
    return {"decoder": decoder, "connection": connection, "fastpath": fastpath}


def write(out: Path, corpora: dict[str, list[bytes]]) -> None:
    """Replace ``out/<harness>/`` with the seeds (named by SHA-1)."""
    for name, seeds in corpora.items():
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for seed in seeds:
            (target / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        print(f"{target}: {len(seeds)} seeds")


def check_corpus(root: Path) -> int:
    """Run every harness's check() on its corpus; the number of failures."""
    failures = 0
    for name, check in HARNESSES.items():
        files = sorted((root / name).glob("*"))
        if not files:
            print(f"{root / name}: no seeds", file=sys.stderr)
            failures += 1
        for path in files:
            try:
                check(path.read_bytes())
            except Exception as exc:
                failures += 1
                print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"{root / name}: {len(files)} seeds checked")
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=CORPUS, help="corpus root to write")
    parser.add_argument("--max", type=int, default=48, help="most seeds per harness")
    parser.add_argument(
        "--check", action="store_true", help="only run check() on the corpus under --out"
    )
    args = parser.parse_args(argv)
    if args.check:
        failures = check_corpus(args.out)
        return 1 if failures else 0
    corpora = build(args.max)
    write(args.out, corpora)
    return 0


if __name__ == "__main__":
    sys.exit(main())

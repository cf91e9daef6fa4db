"""Benchmark: 1 MiB chunk frames through the real frproto API, against XXH3-128 alone.

Run from the repository root::

    .venv/bin/python bench/frame.py [--rounds N] [--buffers N] [--passes N]

What is timed (see bench/README.md for the conventions):

* baseline: ``xxhash.xxh3_128_digest(buf)`` over every buffer, nothing else;
* encode: ``primary.send_chunk(disk, offset, buf, digest=<precomputed>)`` on a primary
  Connection that has negotiated (no compression), opened a relationship with one
  large disk and begun a batch with a huge chunk count. The digest is passed in, as the
  change tracker already has it; the two pieces returned are not joined (the I/O layer
  writes them as they are);
* decode+verify: ``recovery.receive_data(frame)`` then ``recovery.next_event()`` returning
  a verified Chunk, on the matching recovery Connection. ``frame`` is one bytes object
  holding the whole frame (as ``frproto.trio_io`` hands over whole frames); the frames
  are built once, before timing, so the 1 MiB join is not timed;
* encode+decode+verify: the encode and decode times of the same round, added;
* the "digest not supplied" variant: encode computing the digest itself
  (``digest=None``), plus the same decode.

Each round times every measure once over ``passes`` x ``buffers`` x 1 MiB, the measures
interleaved; the GB/s figures are medians over the rounds. ``ratio`` is the median over
the rounds of (baseline time / encode+decode time) within the same round. The last line
of output is one JSON object (name, value, unit, baseline, baseline_value, ratio, extras).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import xxhash

import frproto
from frproto import (
    BatchBegin,
    Chunk,
    CompressionSet,
    Connection,
    ConnectionConfig,
    DiskInfo,
    NegotiateRequest,
    NegotiateResponse,
    QueryRecoveryServer,
    RecoveryType,
    RelationshipAccepted,
    RelationshipCreate,
    Role,
)
from frproto.codec import encode_chunk_header

MIB = 1 << 20
VMID = uuid.UUID("0b7e3f5a-2c1d-4e8f-9a6b-3c5d7e9f1a2b")
DISK_SIZE = 1 << 60
GOAL = 0.9


def _pair(*, verify: bool = True) -> tuple[Connection, Connection]:
    """A primary and a recovery Connection, negotiated, relationship open, batch begun."""
    primary = Connection(Role.PRIMARY)
    recovery = Connection(Role.RECOVERY, ConnectionConfig(verify_digests=verify))

    def to_recovery(wire: bytes) -> None:
        recovery.receive_data(wire)
        assert not isinstance(recovery.next_event(), frproto.NeedData)

    def to_primary(wire: bytes) -> None:
        primary.receive_data(wire)
        assert not isinstance(primary.next_event(), frproto.NeedData)

    to_recovery(primary.send(NegotiateRequest(compression=CompressionSet(0))))
    to_primary(recovery.send(NegotiateResponse(recovery_type=RecoveryType.STANDALONE)))
    disks = (DiskInfo("disk0", DISK_SIZE),)
    to_recovery(primary.send(RelationshipCreate(VMID, "bench-vm", disks)))
    to_primary(recovery.send(RelationshipAccepted(VMID, disks)))
    to_recovery(primary.send(BatchBegin(VMID, 2, 1, chunk_count=(1 << 32) - 1)))
    return primary, recovery


class Workload:
    """The buffers, their digests, the prebuilt frames and the connections."""

    def __init__(self, buffers: int) -> None:
        data = [os.urandom(MIB) for _ in range(buffers)]
        digests = [xxhash.xxh3_128_digest(b) for b in data]
        self.primary, self.recovery = _pair()
        # A receiver that skips verification: what is left is frproto's own cost.
        self.unverified = _pair(verify=False)[1]
        self.offset = 0
        self.recv_offset = 0
        # Frames for the receiver, built once (header + payload in one object).
        self.frames = [
            encode_chunk_header(0, i * MIB, MIB, frproto.ChunkFlags.NONE, d, MIB) + b
            for i, (b, d) in enumerate(zip(data, digests, strict=True))
        ]
        # Every measure reads the same bytes: the payloads inside those frames. (With two
        # separate 64 MiB sets, whichever set a previous measure left in cache won.)
        header = len(self.frames[0]) - MIB
        self.buffers = [memoryview(frame)[header:] for frame in self.frames]
        self.digests = digests
        # A second recovery connection for the digest-not-supplied variant's decode is not
        # needed: decoding does not depend on how the sender got the digest.

    def baseline(self) -> None:
        digest = xxhash.xxh3_128_digest
        for buf in self.buffers:
            digest(buf)

    def encode(self) -> None:
        send_chunk = self.primary.send_chunk
        offset = self.offset
        for buf, digest in zip(self.buffers, self.digests, strict=True):
            send_chunk(0, offset, buf, digest=digest)
            offset += MIB
        self.offset = offset % (DISK_SIZE // 2)

    def encode_digesting(self) -> None:
        send_chunk = self.primary.send_chunk
        offset = self.offset
        for buf in self.buffers:
            send_chunk(0, offset, buf)
            offset += MIB
        self.offset = offset % (DISK_SIZE // 2)

    def decode_unverified(self) -> None:
        receive_data = self.unverified.receive_data
        next_event = self.unverified.next_event
        for frame in self.frames:
            receive_data(frame)
            next_event()

    def decode(self) -> None:
        receive_data = self.recovery.receive_data
        next_event = self.recovery.next_event
        for frame in self.frames:
            receive_data(frame)
            event = next_event()
            if type(event) is not Chunk:
                raise AssertionError(f"expected a Chunk, got {event!r}")


def _timed(fn: Callable[[], None], passes: int) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        fn()
    return time.perf_counter() - start


def _control_rate(messages: list[frproto.Message], seconds: float) -> dict[str, float]:
    """encode_frame + decode_frame round trips per second, per message type."""
    rates: dict[str, float] = {}
    for message in messages:
        frame = frproto.codec.encode_frame(message)
        assert frproto.codec.decode_frame(frame) == message
        count, start = 0, time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(50):
                frproto.codec.decode_frame(frproto.codec.encode_frame(message))
            count += 50
            now = time.perf_counter()
            if now >= deadline:
                break
        rates[type(message).__name__] = count / (now - start)
    return rates


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the JSON line."""
    parser = argparse.ArgumentParser(description="frproto 1 MiB chunk frame benchmark")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median)")
    parser.add_argument("--buffers", type=int, default=64, help="distinct 1 MiB buffers")
    parser.add_argument("--passes", type=int, default=4, help="passes over them per round")
    parser.add_argument("--control-seconds", type=float, default=0.5)
    args = parser.parse_args(argv)

    work = Workload(args.buffers)
    volume = args.passes * args.buffers * MIB
    # Warm up every path once (caches, zero-digest table, branch predictors).
    work.baseline()
    work.encode()
    work.encode_digesting()
    work.decode()
    work.decode_unverified()

    fns: dict[str, Callable[[], None]] = {
        "baseline": work.baseline,
        "encode": work.encode,
        "encode_digesting": work.encode_digesting,
        "decode": work.decode,
        "decode_unverified": work.decode_unverified,
    }
    names = tuple(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        # Rotate the order so that no measure always follows the same one.
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(_timed(fns[name], args.passes))
    times["total"] = [e + d for e, d in zip(times["encode"], times["decode"], strict=True)]
    times["total_digesting"] = [
        e + d for e, d in zip(times["encode_digesting"], times["decode"], strict=True)
    ]

    def gbps(name: str) -> float:
        return float(volume / statistics.median(times[name]) / 1e9)

    base = gbps("baseline")
    figures = {n: gbps(n) for n in times}
    # The headline ratio pairs each round's baseline with the same round's encode+decode
    # (measured back to back), so a noisy neighbour slows both sides of one ratio rather
    # than one side of the medians.
    paired = sorted(b / t for b, t in zip(times["baseline"], times["total"], strict=True))
    paired_digesting = sorted(
        b / t for b, t in zip(times["baseline"], times["total_digesting"], strict=True)
    )
    frames_per_round = args.passes * args.buffers
    us = {n: statistics.median(times[n]) / frames_per_round * 1e6 for n in times}

    def line(label: str, what: str, name: str, note: str) -> None:
        print(f"{label:<9} {what:<30} {figures[name]:7.2f} GB/s  {note}")

    print(
        f"frame: {args.buffers} x 1 MiB random buffers, {args.passes} passes per round, "
        f"{args.rounds} interleaved rounds, medians"
    )
    line("baseline", "xxh3_128 alone", "baseline", f"({us['baseline']:.1f} us/MiB)")
    line("encode", "send_chunk(digest given)", "encode", f"({us['encode']:.1f} us/frame)")
    line(
        "decode",
        "receive_data+next_event+verify",
        "decode",
        f"({us['decode']:.1f} us/frame)",
    )
    line(
        "total",
        "encode+decode+verify",
        "total",
        f"ratio {statistics.median(paired):.3f} (goal >= {GOAL}; rounds "
        f"{paired[0]:.3f}-{paired[-1]:.3f})",
    )
    overhead = us["encode"] + us["decode_unverified"]
    print(
        f"{'framing':<9} {'encode+decode, verify off':<30} {overhead:7.2f} us/frame  "
        f"(frproto's own cost; {overhead / us['baseline'] * 100:.1f}% of one XXH3 pass)"
    )
    line(
        "variant",
        "send_chunk(no digest) alone",
        "encode_digesting",
        f"({us['encode_digesting']:.1f} us/frame)",
    )
    line(
        "variant",
        "encode(digesting)+decode+verify",
        "total_digesting",
        f"ratio {statistics.median(paired_digesting):.3f} (two XXH3 passes)",
    )

    control = _control_rate(
        [
            NegotiateRequest(),
            QueryRecoveryServer(VMID, "bench-vm", (1 << 30, 1 << 34)),
            BatchBegin(VMID, 2, 1, 1000, 1 << 30, 1_700_000_000_000),
        ],
        args.control_seconds,
    )
    for name, rate in control.items():
        print(f"control   {name:<28} {rate:9.0f} encode_frame+decode_frame per s")

    ratio = statistics.median(paired)
    result: dict[str, Any] = {
        "name": "frame",
        "value": round(figures["total"], 3),
        "unit": "GB/s",
        "baseline": "xxh3_128 alone",
        "baseline_value": round(base, 3),
        "ratio": round(ratio, 3),
        "ratio_of_medians": round(figures["total"] / base, 3),
        "ratio_min_round": round(paired[0], 3),
        "ratio_max_round": round(paired[-1], 3),
        "goal_ratio": GOAL,
        "encode_gbps": round(figures["encode"], 3),
        "decode_verify_gbps": round(figures["decode"], 3),
        "digesting_total_gbps": round(figures["total_digesting"], 3),
        "digesting_ratio": round(statistics.median(paired_digesting), 3),
        "encode_us_per_frame": round(us["encode"], 2),
        "framing_overhead_us_per_frame": round(overhead, 2),
        "decode_us_per_frame": round(us["decode"], 2),
        "baseline_us_per_mib": round(us["baseline"], 2),
        "control_round_trips_per_s": {k: round(v) for k, v in control.items()},
        "frame_bytes": MIB,
        "buffers": args.buffers,
        "rounds": args.rounds,
        "passes": args.passes,
    }
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Steps that scenarios share: placing a VM through a broker, creating a relationship,
an initial replication and a delta batch, with well-formed frames built here (the
harness's frames are its own: it never relies on the endpoint's library)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import trio

import frproto as fp

from .scenario import BROKER, Context
from .wire import HarnessError, Target, Wire

#: The disks of every VM the harness creates: small, two of them, one not a multiple of
#: the chunk size.
DISKS: tuple[fp.DiskInfo, ...] = (
    fp.DiskInfo("system", 1 << 20),
    fp.DiskInfo("data-1", 65536 + 4096),
)
CHUNK = 65536
#: How often a query refused BUSY is asked again.
BUSY_RETRIES = 5


def vm_name(vmid: uuid.UUID) -> str:
    return f"frconform-{vmid.hex[:12]}"


async def place(
    ctx: Context, vmid: uuid.UUID, disks: Sequence[fp.DiskInfo] = DISKS
) -> fp.QueryRecoveryServerResponse:
    """Ask the broker where ``vmid`` goes (one connection per query); remembers the VM
    for the cleanup when it was placed."""
    wire = await ctx.ready()
    query = fp.QueryRecoveryServer(vmid, vm_name(vmid), tuple(d.size for d in disks))
    for _ in range(BUSY_RETRIES):
        await wire.send(query)
        got = await wire.receive()
        if not (isinstance(got, fp.Error) and got.code == fp.ErrorCode.BUSY):
            break
        await trio.sleep(0.2)  # BUSY is "try again later", as a primary would (BRK-7)
    ctx.expect(isinstance(got, fp.QueryRecoveryServerResponse), "QueryRecoveryServerResponse", got)
    assert isinstance(got, fp.QueryRecoveryServerResponse)
    answer = got
    await wire.aclose()
    if answer.existing == fp.ExistingVM.NEW:
        ctx.remember(vmid, ctx.target.elsewhere(answer.server_name, answer.port), tuple(disks))
    return answer


async def where_to_replicate(
    ctx: Context, vmid: uuid.UUID, disks: Sequence[fp.DiskInfo] = DISKS
) -> Target:
    """Where a new VM's relationship is created: the endpoint itself, or the node the
    broker places it on (a setup step)."""
    if ctx.kind != BROKER:
        return ctx.target
    answer = await place(ctx, vmid, disks)
    if answer.existing != fp.ExistingVM.NEW:
        raise HarnessError(f"the broker did not place a new VM: {fp.jsonable.describe(answer)}")
    return ctx.target.elsewhere(answer.server_name, answer.port)


@dataclass
class Session:
    """A negotiated connection with a relationship open for a VM of this run."""

    wire: Wire
    vmid: uuid.UUID
    target: Target
    accepted: fp.RelationshipAccepted


async def create(
    ctx: Context, vmid: uuid.UUID | None = None, disks: Sequence[fp.DiskInfo] = DISKS
) -> Session:
    """A new VM of this run, its relationship created (a setup step)."""
    vmid = vmid or ctx.new_vmid()
    target = await where_to_replicate(ctx, vmid, disks)
    wire = await ctx.ready(target)
    await wire.send(fp.RelationshipCreate(vmid, vm_name(vmid), tuple(disks), b"frconform"))
    answer = await wire.receive()
    if not isinstance(answer, fp.RelationshipAccepted):
        raise HarnessError(f"creating a VM of this run was refused: {answer}")
    if ctx.kind != BROKER:
        ctx.remember(vmid, target, tuple(disks))
    return Session(wire, vmid, target, answer)


def data_for(vmid: uuid.UUID, disk_index: int, offset: int, length: int, round_: int) -> bytes:
    """Deterministic, incompressible-looking data for a block of a VM of the run."""
    seed = vmid.bytes + disk_index.to_bytes(2, "big") + round_.to_bytes(4, "big")
    out = bytearray()
    counter = offset
    while len(out) < length:
        out += fp.codec.chunk_digest(seed + counter.to_bytes(8, "big"))
        counter += 16
    return bytes(out[:length])


def chunk_frame(disk_index: int, offset: int, data: bytes) -> tuple[bytes, bytes]:
    """A plain Chunk frame and its digest."""
    digest = fp.codec.chunk_digest(data)
    return fp.codec.encode_frame(fp.Chunk(disk_index, offset, len(data), digest, data)), digest


def ir_frames(session: Session, sequence: int = 0) -> list[tuple[bytes, str]]:
    """A whole IR of the session's VM (data in the first chunk of each disk, zeros
    elsewhere): IRBegin, the chunks, IREnd."""
    frames = [(fp.codec.encode_frame(fp.IRBegin(session.vmid, sequence)), "IRBegin")]
    aggregate = fp.codec.AggregateDigest()
    for index, disk in enumerate(session.accepted.disks):
        for offset in range(0, disk.size, CHUNK):
            length = min(CHUNK, disk.size - offset)
            if offset == 0:
                data = data_for(session.vmid, index, offset, length, 0)
                frame, digest = chunk_frame(index, offset, data)
            else:
                digest = fp.codec.zero_digest(length)
                chunk = fp.Chunk(index, offset, length, digest, b"", fp.ChunkFlags.ZERO)
                frame = fp.codec.encode_frame(chunk)
            aggregate.add(digest)
            frames.append((frame, f"Chunk disk {index} offset {offset}"))
    end = fp.IREnd(session.vmid, sequence, aggregate.count, aggregate.digest())
    frames.append((fp.codec.encode_frame(end), fp.jsonable.describe(end)))
    return frames


def batch_frames(
    session: Session, sequence: int, base: int, blocks: Sequence[tuple[int, int]], round_: int
) -> tuple[list[tuple[bytes, str]], dict[tuple[int, int], bytes]]:
    """A delta batch writing ``blocks`` ((disk, offset) of CHUNK-sized blocks) with data of
    ``round_``; the frames, and the data written by block."""
    written = {
        (d, o): data_for(session.vmid, d, o, min(CHUNK, DISKS[d].size - o), round_)
        for d, o in blocks
    }
    begin = fp.BatchBegin(session.vmid, sequence, base, len(written))
    frames = [(fp.codec.encode_frame(begin), fp.jsonable.describe(begin))]
    aggregate = fp.codec.AggregateDigest()
    for (disk_index, offset), data in written.items():
        frame, digest = chunk_frame(disk_index, offset, data)
        aggregate.add(digest)
        frames.append((frame, f"Chunk disk {disk_index} offset {offset}"))
    end = fp.BatchEnd(session.vmid, sequence, aggregate.count, aggregate.digest())
    frames.append((fp.codec.encode_frame(end), fp.jsonable.describe(end)))
    return frames, written


async def send_frames(wire: Wire, frames: list[tuple[bytes, str]]) -> None:
    for frame, what in frames:
        await wire.send_raw(frame, what)


async def initial_replication(ctx: Context, session: Session, sequence: int = 0) -> fp.Ack:
    """Send a whole IR; the Ack (a setup step: anything else is an error)."""
    await send_frames(session.wire, ir_frames(session, sequence))
    ack = await session.wire.receive()
    if not (isinstance(ack, fp.Ack) and ack.kind == fp.AckKind.IR_COMPLETE):
        raise HarnessError(f"the initial replication was not acknowledged: {ack}")
    return ack


async def reopen_when_free(ctx: Context, session: Session) -> tuple[Wire, object]:
    """After ``session``'s connection was cut: a new connection's RelationshipOpen for its
    VM, asked again while the server still holds the VM (BUSY, until it notices the cut);
    the connection and the answer (a setup step: no answer in time is an error)."""
    with trio.fail_after(ctx.target.timeout):
        while True:
            wire = await ctx.ready(session.target)
            await wire.send(fp.RelationshipOpen(session.vmid))
            got = await wire.receive()
            if not (isinstance(got, fp.Error) and got.code == fp.ErrorCode.BUSY):
                return wire, got
            await wire.aclose()
            await trio.sleep(0.1)

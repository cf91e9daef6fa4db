"""What a relationship's answers say beyond the basics (sections 4.9, 4.10, 6.1, 10.1):
the generation and resume fields of RelationshipAccepted, the IR's sequence, how far the
resume point moves, a create resent with another name and blob, a disk too large to hold,
and what a refusal's text may say."""

from __future__ import annotations

import re

import frproto as fp

from ..scenario import BROKER, REPLICATING, Context, scenario
from ..session import (
    DISKS,
    batch_frames,
    create,
    initial_replication,
    reopen_when_free,
    send_frames,
    vm_name,
    where_to_replicate,
)
from ..wire import Wire

#: Something shaped like a local path in an Error's text (ERR-11): an absolute POSIX path
#: of two components or more, or a Windows drive path.
_PATH = re.compile(r"(?:^|[\s'\"(=:,\[])/[^\s/'\"]+/|\b[A-Za-z]:\\")

#: A disk no recovery server of today holds: 1 PiB (ENC-7 allows it).
HUGE = 1 << 50
MIB = 1 << 20


def _shown(error: fp.Error) -> str:
    return f"Error {error.error_code.name}: {error.text!r}"


async def _create_huge(ctx: Context) -> tuple[Wire, object]:
    """A RelationshipCreate for a VM of the run with one disk of :data:`HUGE` bytes; the
    connection and the answer. Through a broker: at the node it places the VM on (placed
    with the run's usual disks, which is what the cleanup removes)."""
    vmid = ctx.new_vmid()
    target = await where_to_replicate(ctx, vmid)
    wire = await ctx.ready(target)
    huge = (fp.DiskInfo("system", HUGE),)
    await wire.send(fp.RelationshipCreate(vmid, vm_name(vmid), huge, b"frconform"))
    got = await wire.receive()
    if isinstance(got, fp.RelationshipAccepted) and ctx.kind != BROKER:
        ctx.remember(vmid, target, huge)
    return wire, got


@scenario("REP-23", kinds=REPLICATING)
async def disk_too_large(ctx: Context) -> None:
    """A RelationshipCreate with a disk of 1 PiB is refused with NO_SPACE, in a text that
    names the size, and the next request on the connection is answered (an endpoint whose
    storage does hold 1 PiB may accept it instead)."""
    wire, got = await _create_huge(ctx)
    async with ctx.checking("REP-23"):
        if isinstance(got, fp.RelationshipAccepted):
            return  # it can hold the disk: nothing to refuse
        ctx.expect(isinstance(got, fp.Error), "Error NO_SPACE (or RelationshipAccepted)", got)
        assert isinstance(got, fp.Error)
        ctx.expect(got.code == fp.ErrorCode.NO_SPACE, "Error NO_SPACE", _shown(got))
        ctx.expect(str(HUGE) in got.text, f"a text that names the size {HUGE}", _shown(got))
        await wire.send(fp.RelationshipOpen(ctx.new_vmid()))
        answer = await ctx.receive(wire, fp.Error)
        refusal = not fp.closes_connection(answer.code)
        ctx.expect(refusal, "the next request answered (a refusal of an unknown VM)", answer)


@scenario("ERR-11", kinds=REPLICATING)
async def refusal_text_without_internals(ctx: Context) -> None:
    """The Error that refuses a disk of 1 PiB (whatever its code: a failure of the storage
    is the likely one where the refusal is missing) names no local path."""
    _wire, got = await _create_huge(ctx)
    async with ctx.checking("ERR-11"):
        if isinstance(got, fp.Error):
            ctx.expect(not _PATH.search(got.text), "an Error text without local paths", _shown(got))


@scenario("REP-24", kinds=REPLICATING)
async def first_generation(ctx: Context) -> None:
    """A new relationship is at generation 1, and still is once its IR is complete."""
    session = await create(ctx)
    async with ctx.checking("REP-24"):
        ctx.expect(session.accepted.generation == 1, "generation 1", session.accepted)
    await initial_replication(ctx, session)
    async with ctx.checking("REP-24"):
        again = await ctx.request(
            session.wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted
        )
        ctx.expect(again.generation == 1, "generation 1, as created", again)


@scenario("REP-26", kinds=REPLICATING)
async def resume_fields_outside_an_ir(ctx: Context) -> None:
    """A new relationship reports the resume point (0, 0) before its IR; once the IR is
    complete it reports the point past the last disk, (k, 0)."""
    session = await create(ctx)
    new = session.accepted
    async with ctx.checking("REP-26"):
        ctx.expect(new.ir_state == fp.IRState.NOT_STARTED, "ir_state NOT_STARTED", new)
        at_start = (new.resume_disk, new.resume_offset) == (0, 0)
        ctx.expect(at_start, "resume_disk 0, resume_offset 0 (NOT_STARTED)", new)
    await initial_replication(ctx, session)
    async with ctx.checking("REP-26"):
        again = await ctx.request(
            session.wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted
        )
        ctx.expect(again.ir_state == fp.IRState.COMPLETE, "ir_state COMPLETE", again)
        past = (again.resume_disk, again.resume_offset) == (len(DISKS), 0)
        ctx.expect(past, f"resume_disk {len(DISKS)}, resume_offset 0 (COMPLETE)", again)


@scenario("REP-25", kinds=REPLICATING)
async def ir_sequence_is_the_applied_sequence(ctx: Context) -> None:
    """An IR at sequence 5: once acknowledged, the relationship's applied_sequence is 5,
    and a batch 6 on base 5 is applied."""
    session = await create(ctx)
    await initial_replication(ctx, session, sequence=5)
    async with ctx.checking("REP-25"):
        again = await ctx.request(
            session.wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted
        )
        ctx.expect(again.applied_sequence == 5, "applied_sequence 5 (the IR's)", again)
        frames, _ = batch_frames(session, 6, 5, [(0, 0)], round_=1)
        await send_frames(session.wire, frames)
        ack = await ctx.receive(session.wire, fp.Ack)
        applied = ack.kind == fp.AckKind.BATCH_APPLIED and ack.sequence == 6
        ctx.expect(applied, "Ack BATCH_APPLIED 6 (batch 6 on base 5)", ack)


@scenario("REP-27", kinds=REPLICATING)
async def resume_point_after_a_lost_connection(ctx: Context) -> None:
    """An IR whose connection is lost after 24 MiB (zero chunks of 4 MiB, in order) is
    reported IN_PROGRESS with its resume point at 24 MiB: nothing received is sent
    again."""
    disks = (fp.DiskInfo("system", 64 * MIB),)
    session = await create(ctx, disks=disks)
    step = fp.limits.MAX_CHUNK_DATA
    sent = 24 * MIB
    frames = [(fp.codec.encode_frame(fp.IRBegin(session.vmid, 0)), "IRBegin")]
    zero = fp.codec.zero_digest(step)
    for offset in range(0, sent, step):
        chunk = fp.Chunk(0, offset, step, zero, b"", fp.ChunkFlags.ZERO)
        frames.append((fp.codec.encode_frame(chunk), f"Chunk (zero) disk 0 offset {offset}"))
    await send_frames(session.wire, frames)
    await session.wire.aclose()
    async with ctx.checking("REP-27"):
        _wire, got = await reopen_when_free(ctx, session)
        ctx.expect(isinstance(got, fp.RelationshipAccepted), "RelationshipAccepted", got)
        assert isinstance(got, fp.RelationshipAccepted)
        ctx.expect(got.ir_state == fp.IRState.IN_PROGRESS, "ir_state IN_PROGRESS", got)
        at = (got.resume_disk, got.resume_offset)
        ctx.expect(at == (0, sent), f"the resume point at disk 0 offset {sent}", got)


@scenario("REP-28", kinds=REPLICATING)
async def create_resent_with_another_name(ctx: Context) -> None:
    """A RelationshipCreate resent with the replica's disks but another VM name and config
    blob (a VM renamed and reconfigured on the primary) opens the relationship; so does
    the create with the name as it was. (That the server keeps the new name and blob is
    not visible on the wire.)"""
    session = await create(ctx)
    async with ctx.checking("REP-28"):
        for name, blob in (
            (f"{vm_name(session.vmid)}-renamed", b"frconform:2"),
            (vm_name(session.vmid), b"frconform"),
        ):
            again = fp.RelationshipCreate(session.vmid, name, DISKS, blob)
            accepted = await ctx.request(session.wire, again, fp.RelationshipAccepted)
            ctx.expect(accepted.disks == DISKS, "the relationship, with its disks", accepted)
            same = accepted.generation == session.accepted.generation
            ctx.expect(same, "the relationship's generation, unchanged", accepted)

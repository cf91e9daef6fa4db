"""Planned failover (protocol 1.1, sections 4.19 and 4.20) and the versioning of 1.1.

A planned failover changes the endpoint for good: the VM it takes over is failed over
there and its former primary (this harness) is refused from then on, so the harness
cannot remove that replica at the end of the run as it removes the others; the
endpoint's operator removes it (its name starts with ``frconform-``).
"""

from __future__ import annotations

import frproto as fp

from ..scenario import REPLICATING, Context, scenario
from ..session import (
    DISKS,
    Session,
    batch_frames,
    create,
    initial_replication,
    send_frames,
    vm_name,
    where_to_replicate,
)

#: Block size of the state digests asked for.
STATE_BLOCK = 65536


async def state_digest(ctx: Context, session: Session) -> bytes:
    """The replica's state digest, from its own digest maps (REP-22 checks those)."""
    maps = []
    for index, disk in enumerate(DISKS):
        count = -(-disk.size // STATE_BLOCK)
        request = fp.DigestMapRequest(session.vmid, index, STATE_BLOCK, 0, count)
        maps.append((await ctx.request(session.wire, request, fp.DigestMap)).digests)
    return fp.codec.state_digest(maps)


@scenario("FOV-4", "FOV-5", "FOV-7", "FOV-6", kinds=REPLICATING)
async def planned_failover(ctx: Context) -> None:
    """A FailoverRequest at another sequence, then with another state digest, is refused
    with OUT_OF_SEQUENCE and the connection goes on; the right one is answered with
    FailoverDone at the next generation, after which the VM's former primary is refused."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire, vmid = session.wire, session.vmid
    digest = await state_digest(ctx, session)
    async with ctx.checking("FOV-4"):
        await wire.send(fp.FailoverRequest(vmid, 5, STATE_BLOCK, digest))
        await ctx.expect_error(wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)
    async with ctx.checking("FOV-5"):
        other = bytes(b ^ 0xFF for b in digest)
        await wire.send(fp.FailoverRequest(vmid, 0, STATE_BLOCK, other))
        await ctx.expect_error(wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)
    async with ctx.checking("FOV-7"):
        done = await ctx.request(
            wire, fp.FailoverRequest(vmid, 0, STATE_BLOCK, digest), fp.FailoverDone
        )
        want = (vmid, session.accepted.generation + 1, 0)
        ctx.expect(
            (done.vmid, done.generation, done.sequence) == want,
            f"FailoverDone {vmid} generation {want[1]} sequence 0",
            done,
        )
        ctx.forget_vm(vmid)  # failed over: the harness may not remove it any more
    async with ctx.checking("FOV-6"):
        await wire.send(fp.RelationshipOpen(vmid))
        await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)


@scenario("FOV-11", kinds=REPLICATING)
async def failover_done_lost(ctx: Context) -> None:
    """As if a FailoverDone had been lost: after a planned failover, the former primary
    opens the relationship again at the generation before it and is admitted in
    repeat-only mode (RelationshipAccepted at that generation); a batch is refused
    NOT_AUTHORIZED and the connection goes on; the exact repeat of the request is answered
    FailoverDone at the failover's generation again."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire, vmid = session.wire, session.vmid
    digest = await state_digest(ctx, session)
    request = fp.FailoverRequest(vmid, 0, STATE_BLOCK, digest)
    done = await ctx.request(wire, request, fp.FailoverDone)  # a setup step
    ctx.forget_vm(vmid)  # failed over: the harness may not remove it any more
    async with ctx.checking("FOV-11"):
        known = done.generation - 1
        accepted = await ctx.request(
            wire, fp.RelationshipOpen(vmid, known), fp.RelationshipAccepted
        )
        ctx.expect(
            accepted.generation == known,
            f"RelationshipAccepted at the generation presented, {known} (repeat-only)",
            accepted,
        )
        frames, _ = batch_frames(session, 1, 0, [(0, 0)], round_=11)
        await send_frames(wire, frames)
        await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)
        again = await ctx.request(wire, request, fp.FailoverDone)
        want = (vmid, done.generation, 0)
        ctx.expect(
            (again.vmid, again.generation, again.sequence) == want,
            f"FailoverDone {vmid} generation {want[1]} sequence 0 again",
            again,
        )


@scenario("NEG-15", kinds=REPLICATING)
async def relationship_delete_at_1_0(ctx: Context) -> None:
    """A connection negotiated at 1.0 (an endpoint at 1.1 answers a 1.0 request at 1.0)
    carries a whole 1.0 conversation, and a RelationshipDelete with its tag of before 1.1
    (0x0013) is carried out."""
    vmid = ctx.new_vmid()
    target = await where_to_replicate(ctx, vmid, DISKS)
    wire = await ctx.connect(target)
    async with ctx.checking("NEG-15"):
        answer = await ctx.negotiate(wire, fp.NegotiateRequest(version=(1, 0)))
        ctx.expect(answer.ok and answer.version == (1, 0), "compatible at 1.0", answer)
        create = fp.RelationshipCreate(vmid, vm_name(vmid), DISKS, b"frconform")
        accepted = await ctx.request(wire, create, fp.RelationshipAccepted)
        ctx.remember(vmid, target, DISKS)
        await initial_replication(ctx, Session(wire, vmid, target, accepted))
        legacy = fp.codec.ENVELOPE.pack(0, fp.codec.LEGACY_RELATIONSHIP_DELETE, 16) + vmid.bytes
        await wire.send_raw(legacy, "RelationshipDelete with tag 0x0013 (1.0)")
        ack = await ctx.receive(wire, fp.Ack)
        ok = ack.kind == fp.AckKind.RELATIONSHIP_DELETED and ack.sequence == 0
        ctx.expect(ok, "Ack RELATIONSHIP_DELETED 0", ack)
        ctx.forget_vm(vmid)

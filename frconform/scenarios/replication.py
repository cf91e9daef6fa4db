"""The replication session: relationships, IR, delta batches, resends, refusals, digest
maps and removal (sections 4.7-4.18, 10). Against a broker, they run at the node it
places each new VM on."""

from __future__ import annotations

import uuid

import trio

import frproto as fp

from ..scenario import BROKER, NODE, REPLICATING, STANDALONE, Context, scenario
from ..session import (
    CHUNK,
    DISKS,
    Session,
    batch_frames,
    chunk_frame,
    create,
    data_for,
    initial_replication,
    ir_frames,
    place,
    reopen_when_free,
    send_frames,
    vm_name,
    where_to_replicate,
)


@scenario("REP-1", "REP-14", "REP-12", kinds=REPLICATING)
async def create_replicate_reopen(ctx: Context) -> None:
    """A new VM's relationship is created (RelationshipAccepted with its disks, IR not
    started), a whole IR is acknowledged IR_COMPLETE, and a later RelationshipOpen finds
    the IR complete."""
    vmid = ctx.new_vmid()
    target = await where_to_replicate(ctx, vmid)
    wire = await ctx.ready(target)
    async with ctx.checking("REP-1"):
        create_msg = fp.RelationshipCreate(vmid, vm_name(vmid), DISKS, b"frconform")
        accepted = await ctx.request(wire, create_msg, fp.RelationshipAccepted)
        if ctx.kind != BROKER:
            ctx.remember(vmid, target, DISKS)
        ctx.expect(accepted.vmid == vmid, "the created VMID", accepted)
        ctx.expect(accepted.disks == DISKS, "the disks as created", accepted)
        ctx.expect(accepted.ir_state == fp.IRState.NOT_STARTED, "ir_state NOT_STARTED", accepted)
    session = Session(wire, vmid, target, accepted)
    async with ctx.checking("REP-14"):
        await send_frames(wire, ir_frames(session))
        ack = await ctx.receive(wire, fp.Ack)
        ctx.expect(
            ack.kind == fp.AckKind.IR_COMPLETE and ack.sequence == 0, "Ack IR_COMPLETE 0", ack
        )
    await wire.aclose()  # one session per VM at a time: the next connection takes it
    async with ctx.checking("REP-12"):
        again = await ctx.ready(target)
        opened = await ctx.request(again, fp.RelationshipOpen(vmid), fp.RelationshipAccepted)
        ctx.expect(opened.ir_state == fp.IRState.COMPLETE, "ir_state COMPLETE", opened)
        ctx.expect(opened.applied_sequence == 0, "applied_sequence 0", opened)
        ctx.expect(opened.disks == DISKS, "the VM's disks", opened)


@scenario("REP-16", "REP-22", "REP-20", kinds=REPLICATING)
async def delta_batch_and_resend(ctx: Context) -> None:
    """A delta batch is acknowledged BATCH_APPLIED and its data is what the replica's
    digests describe; the same batch sent again is acknowledged again without being
    applied twice, and the next batch follows it."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire = session.wire
    blocks = [(0, 0), (0, 3 * CHUNK), (1, CHUNK)]  # the last one is the short tail block
    frames, written = batch_frames(session, 1, 0, blocks, round_=1)
    async with ctx.checking("REP-16"):
        await send_frames(wire, frames)
        ack = await ctx.receive(wire, fp.Ack)
        ok = ack.kind == fp.AckKind.BATCH_APPLIED and ack.sequence == 1
        ctx.expect(ok, "Ack BATCH_APPLIED 1", ack)
    async with ctx.checking("REP-22"):
        for (disk_index, offset), data in written.items():
            request = fp.DigestMapRequest(session.vmid, disk_index, CHUNK, offset, 1)
            answer = await ctx.request(wire, request, fp.DigestMap)
            want = fp.codec.chunk_digest(data)
            ctx.expect(answer.digests == want, f"block {disk_index}/{offset}: {want.hex()}", answer)
    async with ctx.checking("REP-20"):
        await send_frames(wire, frames)  # the same sequence, the same content
        ack = await ctx.receive(wire, fp.Ack)
        ok = ack.kind == fp.AckKind.BATCH_APPLIED and ack.sequence == 1
        ctx.expect(ok, "Ack BATCH_APPLIED 1 again", ack)
        following, _ = batch_frames(session, 2, 1, [(0, CHUNK)], round_=2)
        await send_frames(wire, following)
        ack = await ctx.receive(wire, fp.Ack)
        ctx.expect(ack.sequence == 2, "Ack BATCH_APPLIED 2 (the resend did not advance)", ack)


@scenario("REP-18", "ERR-4", kinds=REPLICATING)
async def out_of_sequence_batch(ctx: Context) -> None:
    """A batch whose base is not the applied sequence (a gap) is refused with
    OUT_OF_SEQUENCE at its end, and the conversation goes on: the right batch is then
    applied."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire = session.wire
    async with ctx.checking("REP-18"):
        gap, _ = batch_frames(session, 6, 5, [(0, 0)], round_=1)
        await send_frames(wire, gap)
        await ctx.expect_error(wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)
    async with ctx.checking("ERR-4"):
        right, _ = batch_frames(session, 1, 0, [(0, 0)], round_=1)
        await send_frames(wire, right)
        ack = await ctx.receive(wire, fp.Ack)
        ctx.expect(ack.sequence == 1, "Ack BATCH_APPLIED 1 on the same connection", ack)


@scenario("REP-21", kinds=REPLICATING)
async def resend_with_other_content(ctx: Context) -> None:
    """An applied sequence sent again with other content is refused with OUT_OF_SEQUENCE
    (acknowledging it would lose those changes)."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    first, _ = batch_frames(session, 1, 0, [(0, 0)], round_=1)
    await send_frames(session.wire, first)
    await ctx.receive(session.wire, fp.Ack)
    async with ctx.checking("REP-21"):
        other, _ = batch_frames(session, 1, 0, [(0, 0)], round_=9)
        await send_frames(session.wire, other)
        await ctx.expect_error(session.wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)


@scenario("REP-4", kinds=[STANDALONE])
async def unknown_vm(ctx: Context) -> None:
    """A RelationshipOpen for a VMID the server has no relationship for is refused with
    UNKNOWN_VM, and the conversation goes on (asked twice on one connection)."""
    wire = await ctx.ready()
    async with ctx.checking("REP-4"):
        for _ in range(2):
            await wire.send(fp.RelationshipOpen(ctx.new_vmid()))
            await ctx.expect_error(wire, fp.ErrorCode.UNKNOWN_VM, closes=False)


@scenario("REP-5", kinds=[NODE, BROKER])
async def vm_not_here(ctx: Context) -> None:
    """A cluster node answers a RelationshipOpen for a VM it does not hold with
    VM_NOT_HERE (a refusal: asked twice on one connection). Through a broker: at the node
    it places a VM of the run on."""
    target = ctx.target
    if ctx.kind == BROKER:
        placed = await place(ctx, ctx.new_vmid())
        target = ctx.target.elsewhere(placed.server_name, placed.port)
    wire = await ctx.ready(target)
    async with ctx.checking("REP-5"):
        for _ in range(2):
            await wire.send(fp.RelationshipOpen(ctx.new_vmid()))
            await ctx.expect_error(wire, fp.ErrorCode.VM_NOT_HERE, closes=False)


@scenario("REP-3", "REP-2", kinds=REPLICATING)
async def create_twice(ctx: Context) -> None:
    """A RelationshipCreate for a VM that already has a relationship with other disks is
    refused with EXISTS; with the same disks (a primary resending its create after a
    restart) it opens the relationship."""
    session = await create(ctx)
    async with ctx.checking("REP-3"):
        other = (DISKS[0], fp.DiskInfo("data-2", 8192))
        again = fp.RelationshipCreate(session.vmid, vm_name(session.vmid), other, b"")
        await session.wire.send(again)
        await ctx.expect_error(session.wire, fp.ErrorCode.EXISTS, closes=False)
    async with ctx.checking("REP-2"):
        same = fp.RelationshipCreate(session.vmid, vm_name(session.vmid), DISKS, b"")
        accepted = await ctx.request(session.wire, same, fp.RelationshipAccepted)
        ctx.expect(accepted.disks == DISKS, "the relationship, with its disks", accepted)


@scenario("REP-7", kinds=REPLICATING)
async def wrong_generation(ctx: Context) -> None:
    """A RelationshipOpen that presents a generation other than the relationship's is
    refused with NOT_AUTHORIZED (a former primary after a failover)."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire = await ctx.ready(session.target)
    async with ctx.checking("REP-7"):
        stale = fp.RelationshipOpen(session.vmid, generation=session.accepted.generation + 7)
        await wire.send(stale)
        await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)


@scenario("REP-22", kinds=REPLICATING)
async def digest_map_cut_at_the_end(ctx: Context) -> None:
    """A DigestMapRequest for more blocks than the disk has is answered with the blocks up
    to its end, each the digest of what the IR wrote (zeros there)."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    async with ctx.checking("REP-22"):
        size = DISKS[1].size
        request = fp.DigestMapRequest(session.vmid, 1, CHUNK, CHUNK, 100)
        answer = await ctx.request(session.wire, request, fp.DigestMap)
        tail = fp.codec.zero_digest(size - CHUNK)
        ctx.expect(answer.digests == tail, f"one digest, of the last {size - CHUNK} bytes", answer)


@scenario("DEL-3", "DEL-2", kinds=REPLICATING)
async def delete_relationship(ctx: Context) -> None:
    """A RelationshipDelete removes the replica: acknowledged RELATIONSHIP_DELETED, after
    which the VMID is unknown there."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    async with ctx.checking("DEL-3"):
        await session.wire.send(fp.RelationshipDelete(session.vmid))
        ack = await ctx.receive(session.wire, fp.Ack)
        ok = ack.kind == fp.AckKind.RELATIONSHIP_DELETED and ack.sequence == 0
        ctx.expect(ok, "Ack RELATIONSHIP_DELETED 0", ack)
        ctx.forget_vm(session.vmid)
    async with ctx.checking("DEL-2"):
        await session.wire.send(fp.RelationshipOpen(session.vmid))
        gone = fp.ErrorCode.UNKNOWN_VM if ctx.kind == STANDALONE else fp.ErrorCode.VM_NOT_HERE
        await ctx.expect_error(session.wire, gone, closes=False)


@scenario("SM-1", kinds=REPLICATING)
async def chunk_outside_a_transfer(ctx: Context) -> None:
    """A Chunk with no IR or batch begun is UNEXPECTED_MESSAGE, and the connection
    closes."""
    session = await create(ctx)
    async with ctx.checking("SM-1"):
        frame = fp.codec.encode_frame(
            fp.Chunk(0, 0, 4096, fp.codec.zero_digest(4096), b"", fp.ChunkFlags.ZERO)
        )
        await session.wire.send_raw(frame, "Chunk (ZERO) with no transfer begun")
        await ctx.expect_error(session.wire, fp.ErrorCode.UNEXPECTED_MESSAGE, closes=True)


@scenario("REP-11", kinds=REPLICATING)
async def same_vm_on_two_connections(ctx: Context) -> None:
    """While one connection has a VM's relationship open, another's RelationshipOpen for
    it is refused with BUSY (a refusal: that connection goes on)."""
    session = await create(ctx)
    other = await ctx.ready(session.target)
    async with ctx.checking("REP-11"):
        await other.send(fp.RelationshipOpen(session.vmid))
        await ctx.expect_error(other, fp.ErrorCode.BUSY, closes=False)


@scenario("REP-30", "ERR-4", kinds=REPLICATING)
async def initial_replication_twice(ctx: Context) -> None:
    """An IR for a replica whose IR is complete is refused with EXISTS at its IREnd, not
    before (an Error while the IR is in progress would be fatal), and the connection goes
    on: the next request is answered, and the replica is unchanged."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    wire = session.wire
    request = fp.DigestMapRequest(session.vmid, 0, CHUNK, 0, 4)
    before = await ctx.request(wire, request, fp.DigestMap)
    data = data_for(session.vmid, 0, 0, CHUNK, 7)
    frame, digest = chunk_frame(0, 0, data)
    async with ctx.checking("REP-30"):
        await wire.send(fp.IRBegin(session.vmid, 0))
        await wire.send_raw(frame, "Chunk disk 0 offset 0")
        with trio.move_on_after(0.5):
            early = await wire.receive()
            ctx.expect(False, "nothing before the IREnd", early)
        aggregate = fp.codec.AggregateDigest()
        aggregate.add(digest)
        await wire.send(fp.IREnd(session.vmid, 0, 1, aggregate.digest()))
        await ctx.expect_error(wire, fp.ErrorCode.EXISTS, closes=False)
    async with ctx.checking("ERR-4"):
        after = await ctx.request(wire, request, fp.DigestMap)
        ctx.expect(after.digests == before.digests, "the digests of before that IR", after)


def _ir_of(
    session: Session, sequence: int, start: tuple[int, int], chunks: list[tuple[int, int, bytes]]
) -> list[tuple[bytes, str]]:
    """IRBegin at ``start``, the chunks (disk, offset, data: all-zero data goes as a ZERO
    chunk), and IREnd."""
    begin = fp.IRBegin(session.vmid, sequence, start[0], start[1])
    frames = [(fp.codec.encode_frame(begin), fp.jsonable.describe(begin))]
    aggregate = fp.codec.AggregateDigest()
    for disk_index, offset, data in chunks:
        if data.count(0) == len(data):
            digest = fp.codec.zero_digest(len(data))
            zero = fp.Chunk(disk_index, offset, len(data), digest, b"", fp.ChunkFlags.ZERO)
            frame = fp.codec.encode_frame(zero)
            what = f"Chunk ZERO disk {disk_index} offset {offset} length {len(data)}"
        else:
            frame, digest = chunk_frame(disk_index, offset, data)
            what = f"Chunk disk {disk_index} offset {offset} length {len(data)}"
        aggregate.add(digest)
        frames.append((frame, what))
    end = fp.IREnd(session.vmid, sequence, aggregate.count, aggregate.digest())
    frames.append((fp.codec.encode_frame(end), fp.jsonable.describe(end)))
    return frames


def _whole_disks(
    session: Session, start: tuple[int, int] = (0, 0), skip: tuple[int, int] | None = None
) -> list[tuple[int, int, bytes]]:
    """The chunks of an IR from ``start`` (CHUNK-sized, data in the first block of each
    disk, zeros elsewhere), without the one at ``skip``."""
    chunks = []
    for index, disk in enumerate(session.accepted.disks):
        for offset in range(0, disk.size, CHUNK):
            if (index, offset) < start or (index, offset) == skip:
                continue
            length = min(CHUNK, disk.size - offset)
            if offset == 0:
                chunks.append((index, offset, data_for(session.vmid, index, offset, length, 0)))
            else:
                chunks.append((index, offset, bytes(length)))
    return chunks


@scenario("REP-31", "ERR-4", kinds=REPLICATING)
async def initial_replication_past_the_resume_point(ctx: Context) -> None:
    """An IR of a new replica that starts past the last disk, with no chunk, is refused
    with OUT_OF_SEQUENCE at its IREnd (its resume point is the start of the first disk):
    it is not complete, and the connection goes on."""
    session = await create(ctx)
    wire = session.wire
    async with ctx.checking("REP-31"):
        await send_frames(wire, _ir_of(session, 0, (len(DISKS), 0), []))
        await ctx.expect_error(wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)
    async with ctx.checking("ERR-4"):
        again = await ctx.request(wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted)
        ctx.expect(again.ir_state != fp.IRState.COMPLETE, "an IR that is not complete", again)
        resume = (again.resume_disk, again.resume_offset)
        ctx.expect(resume == (0, 0), "the resume point still at disk 0 offset 0", again)


@scenario("REP-32", "REP-13", kinds=REPLICATING)
async def initial_replication_with_a_gap(ctx: Context) -> None:
    """An IR that leaves out one chunk is refused with OUT_OF_SEQUENCE at its IREnd; the
    replica is IN_PROGRESS with a resume point no later than the gap, and an IR resumed
    there completes it (on the same connection)."""
    session = await create(ctx)
    wire = session.wire
    gap = (0, 2 * CHUNK)
    async with ctx.checking("REP-32"):
        await send_frames(wire, _ir_of(session, 0, (0, 0), _whole_disks(session, skip=gap)))
        await ctx.expect_error(wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)
        again = await ctx.request(wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted)
        ctx.expect(again.ir_state == fp.IRState.IN_PROGRESS, "ir_state IN_PROGRESS", again)
        resume = (again.resume_disk, again.resume_offset)
        ctx.expect(resume <= gap, f"a resume point at or before disk 0 offset {gap[1]}", again)
    async with ctx.checking("REP-13"):
        # From the chunk boundary at or before the resume point (an IR may start there).
        start = (resume[0], resume[1] - resume[1] % CHUNK)
        resumed = _ir_of(session, 0, start, _whole_disks(session, start=start))
        await send_frames(wire, resumed)
        ack = await ctx.receive(wire, fp.Ack)
        ok = ack.kind == fp.AckKind.IR_COMPLETE and ack.sequence == 0
        ctx.expect(ok, "Ack IR_COMPLETE 0 for the IR resumed there", ack)


@scenario("CHK-25", "CHK-19", kinds=REPLICATING)
async def overlapping_chunks(ctx: Context) -> None:
    """Where chunks of an IR or a batch overlap, the replica holds the later one's bytes:
    zeros over data and data over zeros in an IR, data over data in a batch."""
    session = await create(ctx)
    wire = session.wire
    half = CHUNK // 2
    first = data_for(session.vmid, 0, 0, CHUNK, 0)
    later = data_for(session.vmid, 0, 2 * CHUNK, CHUNK, 5)
    chunks = [
        *_whole_disks(session),
        (0, half, bytes(half)),  # zeros over the second half of the first chunk's data
        (0, 2 * CHUNK, later),  # data over zeros
    ]
    async with ctx.checking("CHK-19"):
        await send_frames(wire, _ir_of(session, 0, (0, 0), chunks))
        await ctx.receive(wire, fp.Ack)
    async with ctx.checking("CHK-25"):
        request = fp.DigestMapRequest(session.vmid, 0, half, 0, 6)
        got = await ctx.request(wire, request, fp.DigestMap)
        digest = fp.codec.chunk_digest
        want = (
            digest(first[:half])
            + fp.codec.zero_digest(half) * 3
            + digest(later[:half])
            + digest(later[half:])
        )
        ctx.expect(got.digests == want, "the later chunks' bytes where the IR's overlap", got)
        one = data_for(session.vmid, 0, 0, CHUNK, 1)
        two = data_for(session.vmid, 0, half, CHUNK, 2)
        begin = fp.BatchBegin(session.vmid, 1, 0, 2)
        frames = [(fp.codec.encode_frame(begin), fp.jsonable.describe(begin))]
        aggregate = fp.codec.AggregateDigest()
        for offset, data in ((0, one), (half, two)):
            frame, chunk_digest = chunk_frame(0, offset, data)
            aggregate.add(chunk_digest)
            frames.append((frame, f"Chunk disk 0 offset {offset}"))
        end = fp.BatchEnd(session.vmid, 1, 2, aggregate.digest())
        frames.append((fp.codec.encode_frame(end), fp.jsonable.describe(end)))
        await send_frames(wire, frames)
        ack = await ctx.receive(wire, fp.Ack)
        ctx.expect(ack.sequence == 1, "Ack BATCH_APPLIED 1", ack)
        request = fp.DigestMapRequest(session.vmid, 0, half, 0, 3)
        got = await ctx.request(wire, request, fp.DigestMap)
        want = digest(one[:half]) + digest(two[:half]) + digest(two[half:])
        ctx.expect(got.digests == want, "the later chunk's bytes where the batch's overlap", got)


@scenario("REP-17", kinds=REPLICATING)
async def batch_cut_off(ctx: Context) -> None:
    """A batch whose BatchEnd never comes (the connection is cut) leaves the replica as it
    was: its digests are those of before the batch."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    request = fp.DigestMapRequest(session.vmid, 0, CHUNK, 0, 4)
    before = await ctx.request(session.wire, request, fp.DigestMap)
    frames, _ = batch_frames(session, 1, 0, [(0, 0), (0, 2 * CHUNK)], round_=3)
    await send_frames(session.wire, frames[:-1])  # no BatchEnd
    await session.wire.aclose()
    async with ctx.checking("REP-17"):
        wire, got = await reopen_when_free(ctx, session)
        ctx.expect(isinstance(got, fp.RelationshipAccepted), "RelationshipAccepted", got)
        assert isinstance(got, fp.RelationshipAccepted)
        ctx.expect(got.applied_sequence == 0, "applied_sequence still 0", got)
        after = await ctx.request(wire, request, fp.DigestMap)
        ctx.expect(after.digests == before.digests, "the digests of before the batch", after)


@scenario("REP-19", kinds=REPLICATING)
async def batch_before_the_initial_replication(ctx: Context) -> None:
    """A delta batch for a replica whose IR is not complete is refused with
    OUT_OF_SEQUENCE when it ends."""
    session = await create(ctx)
    async with ctx.checking("REP-19"):
        frames, _ = batch_frames(session, 1, 0, [(0, 0)], round_=1)
        await send_frames(session.wire, frames)
        await ctx.expect_error(session.wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)


@scenario("REP-13", kinds=REPLICATING)
async def interrupted_initial_replication(ctx: Context) -> None:
    """An IR cut off after some chunks is reported IN_PROGRESS, with a resume point no
    further than what was sent."""
    session = await create(ctx)
    frames = ir_frames(session)
    await send_frames(session.wire, frames[:5])  # IRBegin and four chunks
    await session.wire.aclose()
    async with ctx.checking("REP-13"):
        _wire, got = await reopen_when_free(ctx, session)
        ctx.expect(isinstance(got, fp.RelationshipAccepted), "RelationshipAccepted", got)
        assert isinstance(got, fp.RelationshipAccepted)
        ctx.expect(got.ir_state == fp.IRState.IN_PROGRESS, "ir_state IN_PROGRESS", got)
        sent_to = (0, 4 * CHUNK)
        ctx.expect(
            (got.resume_disk, got.resume_offset) <= sent_to,
            f"a resume point at or before disk 0 offset {4 * CHUNK}",
            got,
        )


@scenario("SM-7", kinds=REPLICATING)
async def refused_open_closes_the_open_relationship(ctx: Context) -> None:
    """A RelationshipOpen refused while a relationship was open leaves none open: the old
    VM is free for another connection, and an IRBegin for it here is then
    UNEXPECTED_MESSAGE."""
    session = await create(ctx)
    async with ctx.checking("SM-7"):
        await session.wire.send(fp.RelationshipOpen(ctx.new_vmid()))
        got = await ctx.receive(session.wire, fp.Error)
        ctx.expect(not fp.closes_connection(got.code), "a refusal", got)
        other = await ctx.ready(session.target)
        await ctx.request(other, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted)
        await other.aclose()
        await session.wire.send(fp.IRBegin(session.vmid, 0))
        await ctx.expect_error(session.wire, fp.ErrorCode.UNEXPECTED_MESSAGE, closes=True)


@scenario("ERR-6", kinds=REPLICATING)
async def refusal_waits_for_the_batch_end(ctx: Context) -> None:
    """A batch the server will refuse (a gap) is refused only at its BatchEnd: nothing
    comes back while it is in progress."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    frames, _ = batch_frames(session, 9, 8, [(0, 0)], round_=1)
    async with ctx.checking("ERR-6"):
        await send_frames(session.wire, frames[:-1])
        with trio.move_on_after(0.5):
            early = await session.wire.receive()
            ctx.expect(False, "nothing before the BatchEnd", early)
        await send_frames(session.wire, frames[-1:])
        await ctx.expect_error(session.wire, fp.ErrorCode.OUT_OF_SEQUENCE, closes=False)


@scenario("MSG-23", kinds=REPLICATING)
async def config_blob_too_large(ctx: Context) -> None:
    """A RelationshipCreate whose config blob is over MAX_CONFIG_BLOB is refused with
    BAD_VALUE, and the connection closes."""
    vmid = ctx.new_vmid()
    target = await where_to_replicate(ctx, vmid)
    wire = await ctx.ready(target)
    async with ctx.checking("MSG-23"):
        # Built by hand: the library refuses to encode an oversized blob.
        body = _create_body(vmid, bytes(fp.limits.MAX_CONFIG_BLOB + 1))
        await wire.send_raw(_frame(0x0010, body), "RelationshipCreate with a 1 MiB + 1 blob")
        await ctx.expect_error(wire, fp.ErrorCode.BAD_VALUE, closes=True)


@scenario("MSG-33", "MSG-34", kinds=REPLICATING)
async def digest_map_request_limits(ctx: Context) -> None:
    """A DigestMapRequest at an offset that is not a multiple of the block size is
    answered; one for 0 blocks is refused with BAD_VALUE."""
    session = await create(ctx)
    await initial_replication(ctx, session)
    async with ctx.checking("MSG-34"):
        odd = fp.DigestMapRequest(session.vmid, 0, 4096, 1000, 2)
        answer = await ctx.request(session.wire, odd, fp.DigestMap)
        ctx.expect(answer.offset == 1000, "a DigestMap at offset 1000", answer)
    async with ctx.checking("MSG-33"):
        zero = fp.codec.encode_frame(fp.DigestMapRequest(session.vmid, 0, 4096, 0, 1))
        zero = zero[:-4] + (0).to_bytes(4, "big")  # block_count, the last field
        await session.wire.send_raw(zero, "DigestMapRequest for 0 blocks")
        await ctx.expect_error(session.wire, fp.ErrorCode.BAD_VALUE, closes=True)


def _frame(tag: int, body: bytes) -> bytes:
    return (0).to_bytes(2, "big") + tag.to_bytes(2, "big") + len(body).to_bytes(4, "big") + body


def _create_body(vmid: uuid.UUID, blob: bytes) -> bytes:
    """A RelationshipCreate body with any config blob (the layout of section 4.7)."""
    small = fp.codec.encode_frame(fp.RelationshipCreate(vmid, "frconform-big", DISKS, b"\x01"))[8:]
    # vmid (16), name length (u16) and name, blob length (u32) and blob, then the disks.
    name_len = int.from_bytes(small[16:18], "big")
    head = small[: 18 + name_len]
    disks = small[18 + name_len + 4 + 1 :]
    return head + len(blob).to_bytes(4, "big") + blob + disks

"""The clustering broker at the CAP: where a VM is, or will be (sections 4.3-4.4)."""

from __future__ import annotations

import uuid

import trio

import frproto as fp

from ..scenario import BROKER, Context, scenario
from ..session import DISKS, create, place
from ..wire import HarnessError


@scenario("BRK-1", "BRK-2", "BRK-2", kinds=[BROKER])
async def new_then_existing_vm(ctx: Context) -> None:
    """A VM the cluster does not hold is placed (NEW, naming a node); asked again, the
    broker answers EXISTING with the same node."""
    vmid = ctx.new_vmid()
    async with ctx.checking("BRK-1"):
        first = await place(ctx, vmid)
        ctx.expect(first.existing == fp.ExistingVM.NEW, "existing NEW", first)
        ctx.expect(first.vmid == vmid, "the queried VMID", first)
        ctx.expect(bool(first.server_name) and first.port > 0, "a node's name and port", first)
    async with ctx.checking("BRK-2"):
        again = await place(ctx, vmid)
        ctx.expect(again.existing == fp.ExistingVM.EXISTING, "existing EXISTING", again)
    async with ctx.checking("BRK-2"):
        same = (again.server_name, again.port) == (first.server_name, first.port)
        ctx.expect(same, f"the same node ({first.server_name}:{first.port})", again)


@scenario("BRK-3", kinds=[BROKER], needs="deleted_vmid")
async def deleted_vm(ctx: Context) -> None:
    """A VM an administrator deleted (given with --deleted-vmid) is answered DELETED."""
    vmid = ctx.options.deleted_vmid
    assert vmid is not None
    async with ctx.checking("BRK-3"):
        wire = await ctx.ready()
        query = fp.QueryRecoveryServer(vmid, "frconform-deleted", tuple(d.size for d in DISKS))
        answer = await ctx.request(wire, query, fp.QueryRecoveryServerResponse)
        ctx.expect(answer.existing == fp.ExistingVM.DELETED, "existing DELETED", answer)


@scenario("TLS-5", kinds=[BROKER])
async def several_queries_on_one_connection(ctx: Context) -> None:
    """One connection may carry several queries, each answered in turn."""
    wire = await ctx.ready()
    async with ctx.checking("TLS-5"):
        for _ in range(3):
            vmid = ctx.new_vmid()
            query = fp.QueryRecoveryServer(vmid, "frconform", tuple(d.size for d in DISKS))
            answer = await ctx.request(wire, query, fp.QueryRecoveryServerResponse)
            if answer.existing == fp.ExistingVM.NEW:  # placed: the cleanup removes it
                ctx.remember(vmid, ctx.target.elsewhere(answer.server_name, answer.port), DISKS)
            ctx.expect(answer.vmid == vmid, "an answer for the VMID asked", answer)


def _query_frame(vmid: uuid.UUID, sizes: list[int]) -> bytes:
    """A QueryRecoveryServer built by hand (section 4.3), with any disk sizes."""
    name = b"frconform-limits"
    body = vmid.bytes + len(name).to_bytes(2, "big") + name + len(sizes).to_bytes(2, "big")
    body += b"".join(size.to_bytes(8, "big") for size in sizes)
    return b"\x00\x00\x00\x03" + len(body).to_bytes(4, "big") + body


@scenario("MSG-11", kinds=[BROKER])
async def too_many_disks(ctx: Context) -> None:
    """A query with 257 disk sizes is refused with BAD_VALUE, and the connection closes."""
    wire = await ctx.ready()
    async with ctx.checking("MSG-11"):
        frame = _query_frame(ctx.new_vmid(), [65536] * (fp.limits.MAX_DISKS + 1))
        await wire.send_raw(frame, f"QueryRecoveryServer with {fp.limits.MAX_DISKS + 1} disks")
        await ctx.expect_error(wire, fp.ErrorCode.BAD_VALUE, closes=True)


@scenario("MSG-12", kinds=[BROKER])
async def disk_of_size_zero(ctx: Context) -> None:
    """A query with a disk of size 0 is refused with BAD_VALUE, and the connection
    closes."""
    wire = await ctx.ready()
    async with ctx.checking("MSG-12"):
        await wire.send_raw(_query_frame(ctx.new_vmid(), [65536, 0]), "a disk of size 0")
        await ctx.expect_error(wire, fp.ErrorCode.BAD_VALUE, closes=True)


@scenario("DEL-5", kinds=[BROKER])
async def deleted_relationship_is_forgotten(ctx: Context) -> None:
    """After a RelationshipDelete at its node, the broker places the VM anew (NEW), not
    EXISTING on the old node (its view may lag a moment: it is asked a few times)."""
    session = await create(ctx)
    await session.wire.send(fp.RelationshipDelete(session.vmid))
    ack = await session.wire.receive()
    if not isinstance(ack, fp.Ack):
        raise HarnessError(f"the RelationshipDelete was not acknowledged: {ack}")
    ctx.forget_vm(session.vmid)
    async with ctx.checking("DEL-5"):
        with trio.move_on_after(ctx.target.timeout):
            while True:
                again = await place(ctx, session.vmid)
                if again.existing != fp.ExistingVM.EXISTING:
                    break
                await trio.sleep(0.1)
        ctx.expect(again.existing == fp.ExistingVM.NEW, "existing NEW", again)

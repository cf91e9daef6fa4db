"""The clustering broker at the CAP: where a VM is, or will be (sections 4.3-4.4)."""

from __future__ import annotations

import frproto as fp

from ..scenario import BROKER, Context, scenario
from ..session import DISKS, place


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

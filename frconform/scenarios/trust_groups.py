"""A VM bound to one trust group, asked for by a primary of another (sections 4.4, 10.1).

The harness needs a second identity for it (``--other-group-cert``/``--other-group-key``):
a certificate of the endpoint's CA that its authorization admits, in another trust group
than the harness's own, best with storage of its own (then the endpoint must look the
VMID up in every storage location, REP-33, and not just in that group's). The harness's
primary creates a VM; the other group's primary then asks the broker for it (BRK-4),
creates it where it lives (REP-33) and opens it (REP-9): each is refused NOT_AUTHORIZED,
on a connection that goes on.
"""

from __future__ import annotations

import frproto as fp

from ..scenario import BROKER, REPLICATING, Context, scenario
from ..session import DISKS, create, reopen_when_free


@scenario("BRK-4", "REP-33", "REP-9", kinds=REPLICATING, needs="other_group_cert")
async def trust_groups(ctx: Context) -> None:
    """A VM the harness's primary created is refused to a primary of another trust group:
    at the broker (its query, BRK-4) and where the VM lives (a RelationshipCreate, REP-33,
    then a RelationshipOpen, REP-9), each NOT_AUTHORIZED as a refusal. The create is sent
    with other disks and another name, and the harness's primary then finds its replica
    as it made it."""
    other = ctx.options.other_group_cert
    assert other is not None
    session = await create(ctx)
    vmid, where = session.vmid, session.target
    await session.wire.aclose()
    if ctx.kind == BROKER:
        async with ctx.checking("BRK-4"):
            wire = await ctx.ready(ctx.target.with_context(other))
            query = fp.QueryRecoveryServer(vmid, "frconform-other", tuple(d.size for d in DISKS))
            await wire.send(query)
            await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)
            # A refusal: the connection answers the next query.
            await wire.send(fp.QueryRecoveryServer(vmid, "frconform-other"))
            await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)
    wire = await ctx.ready(where.with_context(other))
    async with ctx.checking("REP-33"):
        others = (fp.DiskInfo("other", 1 << 20),)
        await wire.send(fp.RelationshipCreate(vmid, "frconform-other", others, b"other"))
        await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)
    async with ctx.checking("REP-9"):
        # Refused, not UNKNOWN_VM: the VM is held, by another group (and no replica of the
        # other group's was made by the create before, which would be opened here).
        await wire.send(fp.RelationshipOpen(vmid))
        await ctx.expect_error(wire, fp.ErrorCode.NOT_AUTHORIZED, closes=False)
    async with ctx.checking("REP-33"):
        # Nothing was written: the harness's primary opens its replica as it made it.
        _mine, got = await reopen_when_free(ctx, session)
        ctx.expect(isinstance(got, fp.RelationshipAccepted), "RelationshipAccepted", got)
        assert isinstance(got, fp.RelationshipAccepted)
        ctx.expect(got.disks == DISKS, "the replica's own disks", got)

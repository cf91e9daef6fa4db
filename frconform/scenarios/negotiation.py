"""Negotiation: versions, capability choices, authentication types (section 8)."""

from __future__ import annotations

import frproto as fp

from ..scenario import ANY_KIND, Context, check_refusal, scenario
from ..wire import Closed, Wire

OFFER_BIT = {fp.Compression.ZSTD: fp.CompressionSet.ZSTD, fp.Compression.LZ4: fp.CompressionSet.LZ4}


@scenario("NEG-5", "NEG-10", "NEG-6", kinds=ANY_KIND)
async def compatible_version(ctx: Context) -> None:
    """Our own version and the defaults: answered OK and COMPATIBLE, at version 1.0, with
    TLS 1.3 and certificates, naming what the endpoint is."""
    wire = await ctx.connect()
    async with ctx.checking("NEG-5"):
        answer = await ctx.negotiate(wire)
        ctx.expect(answer.status == fp.ErrorCode.OK, "status OK", answer)
        ctx.expect(answer.verdict == fp.VersionVerdict.COMPATIBLE, "verdict COMPATIBLE", answer)
    async with ctx.checking("NEG-10"):
        ctx.expect(
            answer.version == fp.limits.PROTOCOL_VERSION,
            f"version {fp.limits.PROTOCOL_VERSION}",
            answer,
        )
    async with ctx.checking("NEG-6"):
        ctx.expect(answer.auth_type == fp.AuthType.CERTIFICATE, "auth_type CERTIFICATE", answer)
        ctx.expect(answer.encryption == fp.Encryption.TLS13, "encryption TLS13", answer)
        ctx.expect(answer.recovery_type == ctx.kind, f"recovery_type {ctx.kind.name}", answer)
        ctx.expect(
            answer.server_name.lower().rstrip(".") == ctx.target.server_name.lower().rstrip("."),
            f"server_name {ctx.target.server_name} (the name connected to)",
            answer,
        )


@scenario("NEG-5", kinds=ANY_KIND)
async def later_minor_version(ctx: Context) -> None:
    """A primary of a later minor version (1.7) is answered COMPATIBLE at the lower minor."""
    wire = await ctx.connect()
    async with ctx.checking("NEG-5"):
        answer = await ctx.negotiate(
            wire, fp.NegotiateRequest(version=(fp.limits.PROTOCOL_VERSION[0], 7))
        )
        ctx.expect(
            answer.status == fp.ErrorCode.OK and answer.verdict == fp.VersionVerdict.COMPATIBLE,
            "OK and COMPATIBLE",
            answer,
        )
        ctx.expect(
            answer.version == fp.limits.PROTOCOL_VERSION, "version 1.0 (the lower minor)", answer
        )


@scenario("NEG-2", "NEG-7", "NEG-12", kinds=ANY_KIND)
async def mismatched_version(ctx: Context) -> None:
    """Another major version (2.0) is answered MISMATCH with PROTOCOL_MISMATCH and the
    endpoint closes the connection; the answer has the fields of every refusal."""
    wire = await ctx.connect()
    async with ctx.checking("NEG-2"):
        request = fp.NegotiateRequest(version=(2, 0))
        answer = await ctx.negotiate(wire, request)
        ctx.expect(answer.verdict == fp.VersionVerdict.MISMATCH, "verdict MISMATCH", answer)
        ctx.expect(answer.status == fp.ErrorCode.PROTOCOL_MISMATCH, "PROTOCOL_MISMATCH", answer)
        ctx.expect(answer.version[0] == fp.limits.PROTOCOL_VERSION[0], "the endpoint's own version")
    async with ctx.checking("NEG-7"):
        ctx.expect(await wire.closed_by_peer(), "the connection closed after the response")
    async with ctx.checking("NEG-12"):
        check_refusal(ctx, answer, request, fp.ErrorCode.PROTOCOL_MISMATCH)


@scenario("NEG-10", kinds=ANY_KIND)
async def each_compression_choice(ctx: Context) -> None:
    """Each compression offer (none, zstd, LZ4, both) is answered with one of those offered,
    or NONE."""
    offers = {
        "nothing": fp.CompressionSet(0),
        "ZSTD": fp.CompressionSet.ZSTD,
        "LZ4": fp.CompressionSet.LZ4,
        "ZSTD|LZ4": fp.CompressionSet.ZSTD | fp.CompressionSet.LZ4,
    }
    async with ctx.checking("NEG-10"):
        for what, offer in offers.items():
            wire = await ctx.connect()
            answer = await ctx.negotiate(wire, fp.NegotiateRequest(compression=offer))
            ctx.expect(answer.status == fp.ErrorCode.OK, f"OK for an offer of {what}", answer)
            chosen = answer.compression
            ctx.expect(
                chosen == fp.Compression.NONE or bool(offer & OFFER_BIT.get(chosen, 0)),
                f"NONE or a compression of the offer ({what})",
                answer,
            )
            await wire.aclose()


@scenario("NEG-4", "NEG-7", "NEG-12", kinds=ANY_KIND)
async def encryption_not_offered(ctx: Context) -> None:
    """A primary that offers only an unencrypted stream, to an endpoint that runs TLS 1.3,
    is answered NOT_SUPPORTED, and the connection closes."""
    wire = await ctx.connect()
    async with ctx.checking("NEG-4"):
        request = fp.NegotiateRequest(encryption=fp.EncryptionSet.NONE)
        answer = await ctx.negotiate(wire, request)
        ctx.expect(answer.status == fp.ErrorCode.NOT_SUPPORTED, "NOT_SUPPORTED", answer)
    async with ctx.checking("NEG-7"):
        ctx.expect(await wire.closed_by_peer(), "the connection closed after the response")
    async with ctx.checking("NEG-12"):
        check_refusal(ctx, answer, request, fp.ErrorCode.NOT_SUPPORTED)


@scenario("NEG-3", "NEG-7", "NEG-12", kinds=ANY_KIND)
async def integrated_authentication(ctx: Context) -> None:
    """INTEGRATED (Kerberos) authentication, which the endpoint does not accept, is
    answered NOT_AUTHORIZED (echoing the auth type asked for), and the connection closes."""
    wire = await ctx.connect()
    async with ctx.checking("NEG-3"):
        request = fp.NegotiateRequest(auth_type=fp.AuthType.INTEGRATED)
        answer = await ctx.negotiate(wire, request)
        ctx.expect(answer.status == fp.ErrorCode.NOT_AUTHORIZED, "NOT_AUTHORIZED", answer)
        ctx.expect(answer.auth_type == fp.AuthType.INTEGRATED, "auth_type INTEGRATED", answer)
    async with ctx.checking("NEG-7"):
        ctx.expect(await wire.closed_by_peer(), "the connection closed after the response")
    async with ctx.checking("NEG-12"):
        check_refusal(ctx, answer, request, fp.ErrorCode.NOT_AUTHORIZED)


@scenario("TLS-4", "NEG-7", "NEG-12", kinds=ANY_KIND, needs="unauthorized_cert")
async def unauthorized_certificate(ctx: Context) -> None:
    """A peer whose certificate the endpoint's CA issued but no authorization entry names
    is answered NOT_AUTHORIZED with the fields of every refusal (compression NONE although
    it offers both), and the connection closes."""
    assert ctx.options.unauthorized_cert is not None
    wire = await ctx.connect(ctx.target.with_context(ctx.options.unauthorized_cert))
    request = fp.NegotiateRequest()
    async with ctx.checking("TLS-4"):
        answer = await ctx.negotiate(wire, request)
        ctx.expect(answer.status == fp.ErrorCode.NOT_AUTHORIZED, "NOT_AUTHORIZED", answer)
    async with ctx.checking("NEG-7"):
        ctx.expect(await wire.closed_by_peer(), "the connection closed after the response")
    async with ctx.checking("NEG-12"):
        check_refusal(ctx, answer, request, fp.ErrorCode.NOT_AUTHORIZED)


@scenario("ENV-7", kinds=ANY_KIND)
async def ignorable_tag_first(ctx: Context) -> None:
    """A frame with an unknown ignorable tag (bit 0x8000) before the NegotiateRequest is
    skipped: the negotiation that follows is answered as usual."""
    wire = await ctx.connect()
    async with ctx.checking("ENV-7"):
        await wire.send_raw(bytes.fromhex("0000812300000003616263"), "ignorable tag 0x8123")
        answer = await ctx.negotiate(wire)
        ctx.expect(answer.status == fp.ErrorCode.OK, "status OK after the skipped frame", answer)


@scenario("SM-6", "MSG-22", kinds=ANY_KIND)
async def keepalive_between_requests(ctx: Context) -> None:
    """A Keepalive after the negotiation changes nothing and needs no answer: the next
    request is answered as if it had not come."""
    wire = await ctx.ready()
    async with ctx.checking("MSG-22"):
        await wire.send(fp.Keepalive(0xFFFFFFFFFFFFFFFF))
    async with ctx.checking("SM-6"):
        vmid = ctx.new_vmid()
        if ctx.kind == fp.RecoveryType.CLUSTERING_BROKER:
            await wire.send(fp.QueryRecoveryServer(vmid, "frconform-keepalive", (65536,)))
            answer = await ctx.receive(wire, fp.QueryRecoveryServerResponse)
            if answer.existing == fp.ExistingVM.NEW:
                node = ctx.target.elsewhere(answer.server_name, answer.port)
                ctx.remember(vmid, node, (fp.DiskInfo("system", 65536),))
        else:
            await wire.send(fp.RelationshipOpen(vmid))
            got = await ctx.receive(wire, fp.Error)
            # Which refusal is REP-4's and REP-5's business: here, only that the open
            # was answered as if no Keepalive had come.
            ctx.expect(not fp.closes_connection(got.code), "a refusal of the unknown VM", got)
            ctx.expect(not await _closed_soon(wire), "the connection still open", "closed")


async def _closed_soon(wire: Wire) -> bool:
    """Whether the endpoint closes within a moment (a refusal must not close)."""
    import trio

    with trio.move_on_after(0.3):
        got = await wire.receive()
        return isinstance(got, Closed)
    return False


@scenario("MSG-4", kinds=ANY_KIND)
async def any_version_is_negotiated(ctx: Context) -> None:
    """Versions 0.0 and 255.255 are not malformed: each is answered with a
    NegotiateResponse (which verdict is NEG-2's business), not an Error."""
    async with ctx.checking("MSG-4"):
        for version in ((0, 0), (255, 255)):
            wire = await ctx.connect()
            await ctx.negotiate(wire, fp.NegotiateRequest(version=version))
            await wire.aclose()

"""Transport: mutual TLS and what an endpoint does with a client that skips it (1.2)."""

from __future__ import annotations

import ssl
from dataclasses import replace

import trio

import frproto as fp

from ..scenario import ANY_KIND, BROKER, NODE, STANDALONE, Context, check_refusal, scenario
from ..session import place
from ..wire import HarnessError, connect, connect_plain


@scenario("TLS-1", kinds=ANY_KIND)
async def no_client_certificate(ctx: Context) -> None:
    """A client that presents no certificate gets no conversation: the handshake fails or
    the connection ends before any frame."""
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    # Trust whatever the endpoint presents: the check is about the client's side.
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    target = replace(ctx.target, ssl_context=bare, timeout=5.0)
    async with ctx.checking("TLS-1"):
        try:
            wire = await connect(target, ctx.transcript)
        except HarnessError:
            return  # refused in the handshake
        try:
            await wire.send(fp.NegotiateRequest())
            got = await wire.receive()
        except HarnessError:
            return  # refused right after it (TLS 1.3 checks the client's side late)
        finally:
            await wire.aclose()
        ok = not isinstance(got, fp.NegotiateResponse) or got.status != fp.ErrorCode.OK
        ctx.expect(ok, "no conversation without a client certificate", got)


@scenario("TLS-3", kinds=ANY_KIND)
async def no_tls_at_all(ctx: Context) -> None:
    """A client that speaks frproto without TLS gets an Error NOT_AUTHORIZED in plain
    text, and the connection closes."""
    stream = await connect_plain(ctx.target)
    try:
        async with ctx.checking("TLS-3"):
            request = fp.codec.encode_frame(fp.NegotiateRequest())
            ctx.transcript.append(f"[plain TCP] -> NegotiateRequest: {request.hex()}")
            await stream.send_all(request)
            data = bytearray()
            with trio.move_on_after(ctx.target.timeout):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            ctx.transcript.append(f"[plain TCP] <- {bytes(data[:64]).hex()}")
            try:
                got: object = fp.codec.decode_frame(bytes(data))
            except fp.FrprotoError as exc:
                got = f"{bytes(data[:32]).hex()} ({exc})"
            is_refusal = isinstance(got, fp.Error) and got.code == fp.ErrorCode.NOT_AUTHORIZED
            ctx.expect(is_refusal, "one Error NOT_AUTHORIZED, then the end of the stream", got)
    finally:
        await stream.aclose()


@scenario("TLS-10", "NEG-12", kinds=[BROKER])
async def cap_name_at_a_node(ctx: Context) -> None:
    """A node reached with the CAP's name (SNI) answers as the broker when it runs it, and
    otherwise with status BUSY (the primary asks the CAP again), a refusal with the fields
    of every refusal."""
    placed = await place(ctx, ctx.new_vmid())
    node = ctx.target.elsewhere(placed.server_name, placed.port)
    at_node_as_cap = replace(node, server_name=ctx.target.server_name)
    request = fp.NegotiateRequest()
    async with ctx.checking("TLS-10"):
        wire = await ctx.connect(at_node_as_cap)
        answer = await ctx.negotiate(wire, request)
        broker = answer.status == 0 and answer.recovery_type == BROKER
        ctx.expect(broker or answer.status == fp.ErrorCode.BUSY, "the broker, or BUSY", answer)
    if answer.status == fp.ErrorCode.BUSY:
        async with ctx.checking("NEG-12"):
            check_refusal(ctx, answer, request, fp.ErrorCode.BUSY, kind=BROKER)


@scenario("TLS-12", kinds=ANY_KIND)
async def no_sni(ctx: Context) -> None:
    """A connection that sends no SNI (a primary that connects by IP address) is served as
    the host itself: a stand-alone server as itself, a cluster node as the node, never as
    the broker (the node a broker places a VM on, which may be the broker's own)."""
    if ctx.target.no_sni_context is None:
        return  # the harness was given no way to connect without SNI: not checked
    host = ctx.target
    if ctx.kind == BROKER:
        placed = await place(ctx, ctx.new_vmid())
        host = ctx.target.elsewhere(placed.server_name, placed.port)
    kind = STANDALONE if ctx.kind == STANDALONE else NODE
    async with ctx.checking("TLS-12"):
        wire = await ctx.connect_without_sni(host)
        answer = await ctx.negotiate(wire)
        ctx.expect(answer.status == fp.ErrorCode.OK, "status OK", answer)
        ctx.expect(
            answer.recovery_type == kind, f"recovery_type {kind.name} (never the broker)", answer
        )
        name = host.server_name.lower().rstrip(".")
        ctx.expect(answer.server_name.lower().rstrip(".") == name, f"server_name {name}", answer)

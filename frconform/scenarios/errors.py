"""Errors sent by the primary: they end the conversation, whatever they carry (6, 9.3)."""

from __future__ import annotations

import frproto as fp

from ..scenario import ANY_KIND, Context, scenario
from ..wire import Closed, Wire


async def _closes_silently(ctx: Context, wire: Wire) -> None:
    got = await wire.receive()
    ctx.expect(isinstance(got, Closed), "the connection closed, nothing sent back", got)


@scenario("SM-5", kinds=ANY_KIND)
async def error_before_negotiation(ctx: Context) -> None:
    """An Error as the very first frame is allowed (not UNEXPECTED_MESSAGE): it ends the
    conversation, and the endpoint closes without answering."""
    wire = await ctx.connect()
    async with ctx.checking("SM-5"):
        await wire.send(fp.Error(fp.ErrorCode.INTERNAL, "the primary gives up"))
        await _closes_silently(ctx, wire)


@scenario("ERR-5", kinds=ANY_KIND)
async def refusal_code_from_the_primary(ctx: Context) -> None:
    """An Error from the primary is fatal even with a refusal code (BUSY): the endpoint
    closes without answering."""
    wire = await ctx.ready()
    async with ctx.checking("ERR-5"):
        await wire.send(fp.Error(fp.ErrorCode.BUSY, "the primary is busy"))
        await _closes_silently(ctx, wire)


@scenario("MSG-20", kinds=ANY_KIND)
async def error_text_not_utf8(ctx: Context) -> None:
    """An Error whose text is not UTF-8 is still an Error (not a malformed message): the
    endpoint closes without answering BAD_VALUE or anything else."""
    wire = await ctx.ready()
    async with ctx.checking("MSG-20"):
        frame = fp.codec.encode_frame(fp.Error(fp.ErrorCode.INTERNAL, "ab")).replace(
            b"ab", b"\xff\xfe"
        )
        await wire.send_raw(frame, "Error INTERNAL with text ff fe (not UTF-8)")
        await _closes_silently(ctx, wire)


@scenario("MSG-21", kinds=ANY_KIND)
async def error_code_not_in_the_registry(ctx: Context) -> None:
    """An Error with a code the registry does not list (50) is kept as an Error: the
    endpoint closes without answering."""
    wire = await ctx.ready()
    async with ctx.checking("MSG-21"):
        await wire.send(fp.Error(50, "a code from the future"))
        await _closes_silently(ctx, wire)

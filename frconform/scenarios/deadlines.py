"""Deadlines and connection bounds (section 10.2), with the values the operator gives
(``--negotiate-timeout``, ``--ready-timeout``, ``--session-timeout``, ``--frame-timeout``,
``--max-per-address``): without them these scenarios are not applicable, since the
protocol's defaults would make a run wait minutes. Give a test endpoint small values.

A close at a deadline is checked in a window: not before 90 % of the deadline (TIM-6),
and not after 125 % of it plus a second (time to schedule, and to send the Error).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import trio

import frproto as fp

from ..scenario import ANY_KIND, REPLICATING, Context, scenario
from ..session import create
from ..wire import HarnessError, Wire, connect_plain

#: After the last scenario's connections, what an endpoint may still hold (ERR-10's
#: lingering close is 2 s in the reference) before the bound is measured.
SETTLE_SECONDS = 3.0


def _window(deadline: float) -> tuple[float, float]:
    """The earliest and the latest time (since the deadline started) a close may come."""
    return deadline * 0.9 - 0.05, deadline * 1.25 + 1.0


async def _receive_by(wire: Wire, seconds: float) -> fp.Message | object:
    """The next frame, waiting up to ``seconds`` (rather than the target's timeout)."""
    patient = replace(wire.target, timeout=max(0.05, seconds))
    impatient, wire.target = wire.target, patient
    try:
        return await wire.receive()
    finally:
        wire.target = impatient


async def _closed_at(
    ctx: Context, wire: Wire, started: float, deadline: float, code: fp.ErrorCode
) -> None:
    """The endpoint sends an Error ``code`` in the deadline's window, then closes."""
    early, late = _window(deadline)
    got = await _receive_by(wire, started + late - trio.current_time())
    elapsed = trio.current_time() - started
    is_error = isinstance(got, fp.Error) and got.code == code
    ctx.expect(is_error, f"Error {code.name} at the {deadline:g} s deadline", got)
    ctx.expect(elapsed >= early, f"not before {early:.2f} s", f"after {elapsed:.2f} s")
    ctx.expect(await wire.closed_by_peer(), "the connection closed after the Error")


async def _silent_close(stream: trio.SocketStream, seconds: float) -> tuple[bytes, bool]:
    """What came on a plain TCP stream within ``seconds``, and whether it then ended."""
    data = bytearray()
    with trio.move_on_after(seconds):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # a reset: ended all the same
        return bytes(data), True
    return bytes(data), False


@scenario("TIM-1", kinds=ANY_KIND, needs="negotiate_timeout")
async def negotiation_deadline_without_tls(ctx: Context) -> None:
    """A TCP connection that never starts TLS is closed at the negotiation deadline, with
    nothing sent on it (no TLS, so no frame)."""
    deadline = ctx.options.negotiate_timeout
    assert deadline is not None
    early, late = _window(deadline)
    started = trio.current_time()
    stream = await connect_plain(ctx.target)
    try:
        async with ctx.checking("TIM-1"):
            data, ended = await _silent_close(stream, late)
            elapsed = trio.current_time() - started
            ctx.transcript.append(f"[plain TCP] <- {data[:64].hex()} (after {elapsed:.2f} s)")
            ctx.expect(ended, f"the connection closed by {late:.2f} s", "still open")
            ctx.expect(not data, "nothing sent before the close", data[:32].hex())
            ctx.expect(elapsed >= early, f"not before {early:.2f} s", f"after {elapsed:.2f} s")
    finally:
        await stream.aclose()


@scenario("TIM-2", kinds=ANY_KIND, needs="negotiate_timeout")
async def negotiation_deadline_after_tls(ctx: Context) -> None:
    """A connection that completes TLS and sends no NegotiateRequest gets an Error BUSY
    at the negotiation deadline, and one that sends only part of it an Error TRUNCATED;
    both are then closed."""
    deadline = ctx.options.negotiate_timeout
    assert deadline is not None
    async with ctx.checking("TIM-2"):
        started = trio.current_time()
        wire = await ctx.connect()
        await _closed_at(ctx, wire, started, deadline, fp.ErrorCode.BUSY)
        started = trio.current_time()
        wire = await ctx.connect()
        frame = fp.codec.encode_frame(fp.NegotiateRequest())
        await wire.send_raw(frame[:4], "the first 4 bytes of a NegotiateRequest")
        await _closed_at(ctx, wire, started, deadline, fp.ErrorCode.TRUNCATED)


@scenario("TIM-3", kinds=ANY_KIND, needs="ready_timeout")
async def ready_deadline(ctx: Context) -> None:
    """A negotiated connection left idle in READY gets an Error BUSY at the READY idle
    deadline, and is closed."""
    deadline = ctx.options.ready_timeout
    assert deadline is not None
    wire = await ctx.ready()
    async with ctx.checking("TIM-3"):
        await _closed_at(ctx, wire, trio.current_time(), deadline, fp.ErrorCode.BUSY)


@scenario("TIM-4", kinds=REPLICATING, needs="session_timeout")
async def session_deadline(ctx: Context) -> None:
    """A connection left idle with a relationship open gets an Error BUSY at the session
    idle deadline and is closed; so does one left idle inside an IR, between chunks."""
    deadline = ctx.options.session_timeout
    assert deadline is not None
    session = await create(ctx)
    async with ctx.checking("TIM-4"):
        await _closed_at(ctx, session.wire, trio.current_time(), deadline, fp.ErrorCode.BUSY)
        # The VM is free again once the endpoint closed; inside an IR now.
        wire = await ctx.ready(session.target)
        opened = await ctx.request(wire, fp.RelationshipOpen(session.vmid), fp.RelationshipAccepted)
        total = sum(d.size for d in opened.disks)
        await wire.send(fp.IRBegin(session.vmid, 0, 0, 0, total_bytes=total))
        await _closed_at(ctx, wire, trio.current_time(), deadline, fp.ErrorCode.BUSY)


@scenario("TIM-5", kinds=ANY_KIND, needs="frame_timeout")
async def frame_deadline(ctx: Context) -> None:
    """A negotiated connection on which a frame begins and stops (half an envelope) gets
    an Error TRUNCATED at the frame deadline, and is closed."""
    deadline = ctx.options.frame_timeout
    assert deadline is not None
    wire = await ctx.ready()
    async with ctx.checking("TIM-5"):
        frame = fp.codec.encode_frame(fp.Keepalive(5))
        await wire.send_raw(frame[:4], "the first 4 bytes of a Keepalive")
        await _closed_at(ctx, wire, trio.current_time(), deadline, fp.ErrorCode.TRUNCATED)


@scenario("TIM-6", kinds=ANY_KIND, needs="ready_timeout")
async def keepalives_keep_it_open(ctx: Context) -> None:
    """Keepalives sent every third of the READY idle deadline keep a connection open for
    twice that deadline (nothing comes); after the last one, the deadline runs again from
    it: the Error BUSY comes no sooner."""
    deadline = ctx.options.ready_timeout
    assert deadline is not None
    wire = await ctx.ready()
    async with ctx.checking("TIM-6"):
        until = trio.current_time() + 2 * deadline
        token = 0
        last = trio.current_time()
        while trio.current_time() < until:
            token += 1
            await wire.send(fp.Keepalive(token))
            last = trio.current_time()
            with contextlib.suppress(HarnessError):  # NoAnswer: what should happen
                got = await _receive_by(wire, deadline / 3)
                ctx.expect(False, "nothing while Keepalives come", got)
        await _closed_at(ctx, wire, last, deadline, fp.ErrorCode.BUSY)


@scenario("TIM-10", "TIM-12", kinds=ANY_KIND, needs="max_per_address", alone=True)
async def connections_per_address(ctx: Context) -> None:
    """With as many connections from this address as the endpoint's bound held (plain
    TCP, nothing sent), one more is closed at once with nothing sent on it; once they
    are closed, a new connection is served (negotiates)."""
    bound = ctx.options.max_per_address
    assert bound is not None
    await trio.sleep(SETTLE_SECONDS)
    held: list[trio.SocketStream] = []
    try:
        for _ in range(bound):
            held.append(await connect_plain(ctx.target))
        await trio.sleep(0.2)  # let the endpoint take them in
        async with ctx.checking("TIM-12"):
            extra = await connect_plain(ctx.target)
            held.append(extra)
            started = trio.current_time()
            data, ended = await _silent_close(extra, 2.0)
            elapsed = trio.current_time() - started
            ctx.transcript.append(
                f"[plain TCP #{bound + 1}] <- {data[:64].hex()} ({'closed' if ended else 'open'}"
                f" after {elapsed:.2f} s)"
            )
            ctx.expect(ended, f"connection #{bound + 1} closed at once", "still open after 2 s")
            ctx.expect(not data, "nothing sent on it", data[:32].hex())
        async with ctx.checking("TIM-10"):
            for stream in held:
                await stream.aclose()
            held.clear()
            await trio.sleep(0.5)
            wire = await ctx.ready()
            await wire.aclose()
    finally:
        for stream in held:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await stream.aclose()

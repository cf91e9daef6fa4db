"""Scenarios and the checks they make.

A scenario is an async function that talks to the endpoint through :class:`Context` and
checks requirements of ``docs/protocol.md`` by id::

    @scenario("NEG-1", "NEG-2", kinds=ANY_KIND)
    async def compatible_version(ctx: Context) -> None:
        \"\"\"A NegotiateRequest of our version is answered OK/COMPATIBLE.\"\"\"
        wire = await ctx.connect()
        async with ctx.checking("NEG-1"):
            answer = await ctx.negotiate(wire)
            ctx.expect(answer.status == 0, "status OK", answer)

Each ``checking`` block checks one requirement: the block passing is a pass; a failed
``expect``, an unexpected message, no answer or a lost connection inside it is a failure
of that requirement, reported with the transcript. After a failure the scenario's later
blocks are not run (they would only fail as a consequence): their requirements are
reported "not reached", so a broken endpoint fails exactly the requirements it breaks.
A requirement's result is the worst of its checks, over every scenario.
"""

from __future__ import annotations

import contextlib
import enum
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import frproto as fp

from .wire import Closed, HarnessError, Target, Wire, connect

M = TypeVar("M", bound=fp.Message)

#: Endpoint kinds, as NegotiateResponse.recovery_type tells them.
STANDALONE: Final = fp.RecoveryType.STANDALONE
BROKER: Final = fp.RecoveryType.CLUSTERING_BROKER
NODE: Final = fp.RecoveryType.CLUSTER_NODE
ANY_KIND: Final = frozenset({STANDALONE, BROKER, NODE})
#: Where a replication session can be run: a stand-alone server itself, or the node a
#: broker places a new VM on (a cluster node reached directly takes new VMs only through
#: its broker).
REPLICATING: Final = frozenset({STANDALONE, BROKER})

KIND_NAMES: Final = {
    STANDALONE: "a stand-alone recovery server",
    BROKER: "a clustering broker",
    NODE: "a cluster node",
}


class Status(enum.StrEnum):
    """A requirement's result."""

    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Check:
    """One check of one requirement, in one scenario."""

    requirement: str
    scenario: str
    status: Status
    detail: str = ""
    transcript: tuple[str, ...] = ()


class CheckFailed(Exception):
    """An expectation did not hold (raised by :meth:`Context.expect`)."""


ScenarioFunction = Callable[["Context"], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """A registered scenario: what it checks and where it applies."""

    name: str
    requirements: tuple[str, ...]
    kinds: frozenset[fp.RecoveryType]
    doc: str
    run: ScenarioFunction
    #: An option the scenario needs (e.g. "deleted_vmid"); without it: not applicable.
    needs: str = ""
    #: Runs after the others, by itself (it fills the endpoint's connection bounds).
    alone: bool = False


#: Every scenario, in the order they run.
SCENARIOS: list[Scenario] = []


def scenario(
    *requirements: str,
    kinds: Iterable[fp.RecoveryType] = ANY_KIND,
    needs: str = "",
    name: str = "",
    alone: bool = False,
) -> Callable[[ScenarioFunction], ScenarioFunction]:
    """Register a scenario that checks ``requirements`` on endpoints of ``kinds``."""

    def register(fn: ScenarioFunction) -> ScenarioFunction:
        doc = " ".join((fn.__doc__ or "").split())
        SCENARIOS.append(
            Scenario(
                name or fn.__name__,
                tuple(requirements),
                frozenset(kinds),
                doc,
                fn,
                needs,
                alone,
            )
        )
        return fn

    return register


@dataclass
class Options:
    """What the person running the harness gives it beyond the endpoint."""

    #: A VMID an administrator deleted in the cluster, for the broker's DELETED answer.
    deleted_vmid: uuid.UUID | None = None
    #: A client context presenting a certificate of the endpoint's CA that no authorization
    #: entry names (``--unauthorized-cert``/``--unauthorized-key``), for TLS-4.
    unauthorized_cert: ssl.SSLContext | None = None
    #: A client context presenting a certificate that the endpoint authorizes in another
    #: trust group than the harness's own (``--other-group-cert``/``--other-group-key``),
    #: for BRK-4, REP-9 and REP-33.
    other_group_cert: ssl.SSLContext | None = None
    #: The endpoint's deadlines (docs/protocol.md 10.2), in seconds, as its operator set
    #: them; the scenarios that check one need it (a run with the defaults would wait
    #: minutes: give small values to a test endpoint).
    negotiate_timeout: float | None = None
    ready_timeout: float | None = None
    session_timeout: float | None = None
    frame_timeout: float | None = None
    #: The endpoint's bound on connections from one address (TIM-10, TIM-12).
    max_per_address: int | None = None


@dataclass
class Created:
    """A VM the harness created (and must remove at the end)."""

    vmid: uuid.UUID
    target: Target
    disks: tuple[fp.DiskInfo, ...]


@dataclass
class Context:
    """What a scenario works with: the endpoint, its kind, and the checks so far."""

    target: Target
    kind: fp.RecoveryType
    options: Options
    scenario: Scenario
    checks: list[Check] = field(default_factory=list)
    created: list[Created] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    broken: str = ""
    _wires: list[Wire] = field(default_factory=list)

    # -- checks ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def checking(self, requirement: str) -> AsyncIterator[None]:
        """Check ``requirement`` with the block (see the module docstring)."""
        if requirement not in self.scenario.requirements:
            raise RuntimeError(f"{self.scenario.name} does not declare {requirement}")
        mark = len(self.transcript)
        try:
            yield
        except (CheckFailed, HarnessError) as exc:
            self.broken = f"{requirement} failed earlier in this scenario"
            self._record(requirement, Status.FAILED, str(exc), self.transcript[max(0, mark - 4) :])
            raise _Skip from None
        self._record(requirement, Status.PASSED)

    def _record(
        self, requirement: str, status: Status, detail: str = "", transcript: Iterable[str] = ()
    ) -> None:
        self.checks.append(
            Check(requirement, self.scenario.name, status, detail, tuple(transcript))
        )

    def expect(self, condition: bool, expected: str, got: object = None) -> None:
        """Fail the current check unless ``condition``: "expected ..., got ..."."""
        if not condition:
            shown = fp.jsonable.describe(got) if isinstance(got, fp.Message) else repr(got)
            raise CheckFailed(f"expected {expected}; got {shown}")

    # -- talking -----------------------------------------------------------------------------

    async def connect(self, target: Target | None = None, *, half_close: bool = False) -> Wire:
        """A new TLS connection (to the endpoint, or to ``target``); ``half_close``: one
        that can end its stream with ``close_notify`` and go on reading."""
        wire = await connect(target or self.target, self.transcript, half_close=half_close)
        self._wires.append(wire)
        return wire

    async def connect_without_sni(self, target: Target | None = None) -> Wire:
        """A new TLS connection that sends no SNI (to the endpoint, or to ``target``)."""
        wire = await connect(target or self.target, self.transcript, sni=False)
        self._wires.append(wire)
        return wire

    async def close_all(self) -> None:
        for wire in self._wires:
            await wire.aclose()
        self._wires.clear()

    async def receive(self, wire: Wire, kind: type[M]) -> M:
        """The next frame, which must be a ``kind`` (else the check fails)."""
        got = await wire.receive()
        if isinstance(got, fp.Error) and kind is not fp.Error:
            raise CheckFailed(
                f"expected {kind.__name__}; got Error {_code_name(got.code)}: {got.text}"
            )
        self.expect(isinstance(got, kind), kind.__name__, got)
        assert isinstance(got, kind)
        return got

    async def request(self, wire: Wire, message: fp.Message, kind: type[M]) -> M:
        """Send ``message``; the answer must be a ``kind``."""
        await wire.send(message)
        return await self.receive(wire, kind)

    async def negotiate(
        self, wire: Wire, request: fp.NegotiateRequest | None = None
    ) -> fp.NegotiateResponse:
        """Send a NegotiateRequest (ours by default) and return the answer."""
        return await self.request(wire, request or fp.NegotiateRequest(), fp.NegotiateResponse)

    async def ready(self, target: Target | None = None) -> Wire:
        """A connection negotiated to READY (a setup step: a refusal here is an error)."""
        wire = await self.connect(target)
        answer = await self.negotiate(wire)
        if answer.status != 0 or answer.verdict != fp.VersionVerdict.COMPATIBLE:
            raise HarnessError(f"negotiation refused: {fp.jsonable.describe(answer)}")
        return wire

    async def expect_error(
        self, wire: Wire, code: fp.ErrorCode, *, closes: bool, answers_first: int = 0
    ) -> fp.Error:
        """The endpoint's next frame must be an Error with ``code``; with ``closes``, it
        must then close the connection. ``answers_first``: up to that many other messages
        may come before it (the answers to whole requests sent before the violation)."""
        got = await wire.receive()
        while answers_first and isinstance(got, fp.Message) and not isinstance(got, fp.Error):
            answers_first -= 1
            got = await wire.receive()
        if isinstance(got, Closed):
            raise CheckFailed(f"expected Error {code.name}; the endpoint closed ({got.how})")
        self.expect(isinstance(got, fp.Error), f"Error {code.name}", got)
        assert isinstance(got, fp.Error)
        self.expect(
            got.code == code, f"Error {code.name}", f"Error {_code_name(got.code)}: {got.text}"
        )
        if closes:
            self.expect(await wire.closed_by_peer(), "the connection closed after the Error")
        return got

    # -- VMs of the run ---------------------------------------------------------------------

    def new_vmid(self) -> uuid.UUID:
        """A VMID for a VM of this run (random: never one the endpoint holds)."""
        return uuid.uuid4()

    def remember(self, vmid: uuid.UUID, target: Target, disks: tuple[fp.DiskInfo, ...]) -> None:
        """Note a VM this run created, for the cleanup."""
        self.created.append(Created(vmid, target, disks))

    def forget_vm(self, vmid: uuid.UUID) -> None:
        """A VM of the run that a scenario removed itself."""
        self.created = [c for c in self.created if c.vmid != vmid]


def _code_name(code: int) -> str:
    try:
        return fp.ErrorCode(code).name
    except ValueError:
        return str(code)


class _Skip(Exception):
    """Ends a scenario at its first failed check (caught by :func:`run_one`)."""


async def run_one(ctx: Context) -> str:
    """Run ``ctx.scenario``; the error that stopped it outside any check ("" if none)."""
    try:
        await ctx.scenario.run(ctx)
    except _Skip:
        return ""
    except (HarnessError, CheckFailed) as exc:
        # Outside a check: a setup step failed, so nothing after it could be checked.
        ctx.broken = f"setup failed: {exc}"
        return str(exc)
    finally:
        await ctx.close_all()
    return ""


def not_applicable(requirements: Iterable[str], scenario: str, why: str) -> list[Check]:
    """N/A checks for a scenario that does not run."""
    return [Check(r, scenario, Status.NOT_APPLICABLE, why) for r in requirements]


def check_refusal(
    ctx: Context,
    answer: fp.NegotiateResponse,
    request: fp.NegotiateRequest,
    status: int,
    *,
    kind: fp.RecoveryType | None = None,
    server_name: str | None = None,
) -> None:
    """Expect ``answer`` to be the refusal of ``request`` with ``status`` that NEG-12's
    table gives: the listener's kind and name (``ctx``'s unless given), its own
    encryption level (TLS13: the harness speaks TLS), the auth type echoed, the verdict
    and version from the two versions alone, and compression NONE."""
    ours = fp.limits.PROTOCOL_VERSION
    kind = ctx.kind if kind is None else kind
    name = (server_name or ctx.target.server_name).lower().rstrip(".")
    ctx.expect(answer.status == status, f"status {_code_name(status)}", answer)
    if request.version[0] != ours[0]:
        ctx.expect(answer.verdict == fp.VersionVerdict.MISMATCH, "verdict MISMATCH", answer)
        ctx.expect(answer.version[0] != request.version[0], "the endpoint's own version", answer)
    else:
        ctx.expect(answer.verdict == fp.VersionVerdict.COMPATIBLE, "verdict COMPATIBLE", answer)
        lower = (ours[0], min(ours[1], request.version[1]))
        ctx.expect(answer.version == lower, f"version {lower} (the lower minor)", answer)
    ctx.expect(answer.compression == fp.Compression.NONE, "compression NONE", answer)
    ctx.expect(answer.recovery_type == kind, f"recovery_type {kind.name}", answer)
    ctx.expect(answer.encryption == fp.Encryption.TLS13, "encryption TLS13 (its own)", answer)
    ctx.expect(answer.auth_type == request.auth_type, f"auth_type {request.auth_type.name}", answer)
    ctx.expect(answer.server_name.lower().rstrip(".") == name, f"server_name {name}", answer)

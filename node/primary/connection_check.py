"""Test a primary's connection to a recovery server or a cluster's CAP, step by step
(Hyper-V's ``Test-VMReplicationConnection``): reach, TLS, negotiation, authorization and,
at a CAP, the clustering broker.

It connects exactly as a replication cycle does (:meth:`Route.dial`, through
:class:`RecoveryClient`) and sends nothing after the negotiation: no relationship is
opened and a broker is never asked to place a VM, so testing changes nothing on the
recovery side. Each failure is told with its reason; the steps after it are not run.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import trio

import frproto as fp
from frlink import network
from frlink.config import NO_COMPRESSION
from frlink.tls import ConnectFailure, TLSFailure, describe_tls_error

from .client import RecoveryClient
from .resolve import resolve_host

#: The steps, in order.
STEPS = ("reach", "tls", "negotiation", "authorization")

_TYPES = {
    fp.RecoveryType.STANDALONE: "a stand-alone recovery server",
    fp.RecoveryType.CLUSTERING_BROKER: "a clustering broker (the cluster's CAP)",
    fp.RecoveryType.CLUSTER_NODE: "a recovery node of a cluster",
}


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the test: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """The steps run, in order; the last one failed when ``ok`` is False."""

    target: str
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        """True when every step passed."""
        return all(s.ok for s in self.steps)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "target": self.target,
            "ok": self.ok,
            "steps": [{"step": s.name, "ok": s.ok, "detail": s.detail} for s in self.steps],
        }


def _os_reason(exc: OSError) -> str:
    """The system's words (``Connection refused``): trio's "all attempts to connect
    failed" keeps the last attempt's error as its cause."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[-1]
        else:
            current = current.__cause__ or current.__context__
    return str(exc) or type(exc).__name__


async def _reach(
    host: str, port: int, hosts: Mapping[str, str], local: str | None, timeout: float
) -> tuple[Step, str | None]:
    try:
        address = await resolve_host(host, port, hosts)
    except OSError as exc:
        return Step("reach", False, str(exc.strerror or exc)), None
    try:
        with trio.fail_after(timeout):
            stream = await network.current().connect(address, port, local_address=local)
    except trio.TooSlowError:
        return Step("reach", False, f"{address}:{port}: no answer in {timeout:g} s"), None
    except OSError as exc:
        return Step("reach", False, f"{address}:{port}: {_os_reason(exc)}"), None
    await stream.aclose()
    return Step("reach", True, f"TCP to {address}:{port}"), address


async def check_connection(
    host: str,
    port: int,
    *,
    server_name: str,
    ssl_context: ssl.SSLContext,
    local_address: str | None = None,
    compression: fp.CompressionSet = NO_COMPRESSION,
    hosts: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> ConnectionReport:
    """Run the steps against ``host:port`` (TLS name ``server_name``) and report them.

    Never raises for what the far side or the network does: each becomes a failed step.
    """
    target = f"{server_name} at {host}:{port}"
    reach, address = await _reach(host, port, hosts or {}, local_address, timeout)
    steps = [reach]
    if address is None:
        return ConnectionReport(target, tuple(steps))
    try:
        client = await RecoveryClient.connect(
            address,
            port,
            server_name=server_name,
            ssl_context=ssl_context,
            local_address=local_address,
            compression=compression,
            timeout=timeout,
        )
    except ConnectFailure as exc:
        steps[0] = Step("reach", False, str(exc))
        return ConnectionReport(target, tuple(steps))
    except TLSFailure as exc:
        # Our side refused the server: its certificate does not chain to our CA, does
        # not name server_name, has expired...
        steps.append(Step("tls", False, f"the server's certificate: {exc}"))
        return ConnectionReport(target, tuple(steps))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        # TLS 1.3: the server's verdict on our certificate arrives at the first read.
        why = describe_tls_error(exc)
        steps.append(Step("tls", False, f"the server refused our certificate: {why}"))
        return ConnectionReport(target, tuple(steps))
    except trio.TooSlowError:
        steps.append(Step("tls", True, f"{server_name}'s certificate trusted"))
        steps.append(Step("negotiation", False, f"no NegotiateResponse in {timeout:g} s"))
        return ConnectionReport(target, tuple(steps))
    except fp.NotAuthorized as exc:
        steps.append(Step("tls", True, "certificates trusted both ways"))
        steps.append(Step("negotiation", True, "protocol version compatible"))
        steps.append(
            Step(
                "authorization",
                False,
                f"the server does not admit this primary ({exc}): no authorization entry "
                f"names our certificate's name",
            )
        )
        return ConnectionReport(target, tuple(steps))
    except fp.FrprotoError as exc:
        steps.append(Step("tls", True, "certificates trusted both ways"))
        steps.append(Step("negotiation", False, f"{type(exc).__name__}: {exc}"))
        return ConnectionReport(target, tuple(steps))
    try:
        answer = client.negotiated
        major, minor = answer.version
        steps.append(Step("tls", True, "certificates trusted both ways (TLS 1.3)"))
        steps.append(
            Step(
                "negotiation",
                True,
                f"protocol {major}.{minor}, {_TYPES.get(answer.recovery_type, 'unknown')}, "
                f"compression {answer.compression.name.lower()}",
            )
        )
        steps.append(Step("authorization", True, "this primary is admitted"))
        if client.is_broker:
            steps.append(Step("broker", True, f"the clustering broker answers at {server_name}"))
    finally:
        await client.aclose()
    return ConnectionReport(target, tuple(steps))

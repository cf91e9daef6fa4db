"""How a recovery server answers a NegotiateRequest (a pure function of request and policy).

Rules (``docs/protocol.md``, "Negotiation"):

* Different major version: verdict MISMATCH, status PROTOCOL_MISMATCH; the connection
  closes after the response. Same major: COMPATIBLE, at the lower of the two minors.
* The authentication type must be one the server accepts, else status NOT_AUTHORIZED.
* The server's encryption level must be among those offered, else NOT_SUPPORTED.
* Compression: the first of the server's preferences that the primary offered, or NONE.

Every answer whose status is not OK (a *refusal*: these three, and a peer the server does
not authorize, TLS-4, or a node asked for a broker it does not run, TLS-10) is built by
:func:`refuse_negotiation` (NEG-12): it carries the refusal's status and what the server
*is* (version, recovery type, encryption level, name, the auth type echoed), and nothing
it would have *chosen* (compression NONE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._enums import (
    COMPRESSION_OFFER_BIT,
    ENCRYPTION_OFFER_BIT,
    AuthType,
    Compression,
    Encryption,
    RecoveryType,
    VersionVerdict,
)
from ._errors import ErrorCode
from ._messages import NegotiateRequest, NegotiateResponse
from .limits import PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """What a recovery server is and what it accepts.

    Attributes:
        recovery_type: what this listener answers as (stand-alone, broker, node).
        server_name: this listener's name (the host's FQDN, or the broker's CAP name).
        compression: compression types in order of preference (empty: never compress).
        encryption: the encryption level this listener runs at.
        auth_types: authentication types accepted.
        version: the protocol version this server speaks.
    """

    recovery_type: RecoveryType
    server_name: str
    compression: tuple[Compression, ...] = (Compression.LZ4, Compression.ZSTD)
    encryption: Encryption = Encryption.TLS13
    auth_types: frozenset[AuthType] = field(
        default_factory=lambda: frozenset({AuthType.CERTIFICATE})
    )
    version: tuple[int, int] = PROTOCOL_VERSION


def refuse_negotiation(
    request: NegotiateRequest, policy: ServerPolicy, status: int
) -> NegotiateResponse:
    """The NegotiateResponse that refuses ``request`` with ``status`` (NEG-12).

    Every refusal is built here, whatever its cause (a foreign major version, an auth type
    or encryption level not accepted, a peer not authorized, a broker not run here): the
    verdict says only whether the major versions differ; the version is the server's own
    on MISMATCH, else its major and the lower of the two minors; ``recovery_type``,
    ``encryption`` and ``server_name`` are the listener's (NEG-6), ``auth_type`` echoes the
    request's; compression is NONE, so that a refusal tells nothing of what the server would
    have chosen for a conversation it does not hold.

    Raises:
        ValueError: ``status`` is OK (that is not a refusal).
    """
    if status == ErrorCode.OK:
        raise ValueError("a refusal needs a status other than OK")
    ours_major, ours_minor = policy.version
    theirs_major, theirs_minor = request.version
    if theirs_major != ours_major:
        verdict, version = VersionVerdict.MISMATCH, policy.version
    else:
        verdict, version = VersionVerdict.COMPATIBLE, (ours_major, min(ours_minor, theirs_minor))
    return NegotiateResponse(
        status=status,
        verdict=verdict,
        version=version,
        recovery_type=policy.recovery_type,
        compression=Compression.NONE,
        encryption=policy.encryption,
        auth_type=request.auth_type,
        server_name=policy.server_name,
    )


def answer_negotiation(request: NegotiateRequest, policy: ServerPolicy) -> NegotiateResponse:
    """The NegotiateResponse that ``policy`` gives to ``request`` (NEG-1 to NEG-6); a
    refusal is :func:`refuse_negotiation`'s."""
    ours_major, ours_minor = policy.version
    theirs_major, theirs_minor = request.version
    if theirs_major != ours_major:
        return refuse_negotiation(request, policy, ErrorCode.PROTOCOL_MISMATCH)
    if request.auth_type not in policy.auth_types:
        return refuse_negotiation(request, policy, ErrorCode.NOT_AUTHORIZED)
    if not request.encryption & ENCRYPTION_OFFER_BIT[policy.encryption]:
        return refuse_negotiation(request, policy, ErrorCode.NOT_SUPPORTED)
    offered = [
        c for c in policy.compression if request.compression & COMPRESSION_OFFER_BIT.get(c, 0)
    ]
    return NegotiateResponse(
        status=ErrorCode.OK,
        verdict=VersionVerdict.COMPATIBLE,
        version=(ours_major, min(ours_minor, theirs_minor)),
        recovery_type=policy.recovery_type,
        compression=offered[0] if offered else Compression.NONE,
        encryption=policy.encryption,
        auth_type=request.auth_type,
        server_name=policy.server_name,
    )

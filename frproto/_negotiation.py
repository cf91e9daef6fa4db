"""How a recovery server answers a NegotiateRequest (a pure function of request and policy).

Rules (``docs/protocol.md``, "Negotiation"):

* Different major version: verdict MISMATCH, status PROTOCOL_MISMATCH; the connection
  closes after the response. Same major: COMPATIBLE, at the lower of the two minors.
* The authentication type must be one the server accepts, else status NOT_AUTHORIZED.
* The server's encryption level must be among those offered, else NOT_SUPPORTED.
* Compression: the first of the server's preferences that the primary offered, or NONE.
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


def answer_negotiation(request: NegotiateRequest, policy: ServerPolicy) -> NegotiateResponse:
    """The NegotiateResponse that ``policy`` gives to ``request``."""
    ours_major, ours_minor = policy.version
    theirs_major, theirs_minor = request.version
    verdict = VersionVerdict.COMPATIBLE
    version = (ours_major, min(ours_minor, theirs_minor))
    compression = Compression.NONE
    if theirs_major != ours_major:
        verdict, version, status = (
            VersionVerdict.MISMATCH,
            policy.version,
            ErrorCode.PROTOCOL_MISMATCH,
        )
    elif request.auth_type not in policy.auth_types:
        status = ErrorCode.NOT_AUTHORIZED
    elif not request.encryption & ENCRYPTION_OFFER_BIT[policy.encryption]:
        status = ErrorCode.NOT_SUPPORTED
    else:
        status = ErrorCode.OK
        offered = [
            c for c in policy.compression if request.compression & COMPRESSION_OFFER_BIT.get(c, 0)
        ]
        compression = offered[0] if offered else Compression.NONE
    return NegotiateResponse(
        status=status,
        verdict=verdict,
        version=version,
        recovery_type=policy.recovery_type,
        compression=compression,
        encryption=policy.encryption,
        auth_type=request.auth_type,
        server_name=policy.server_name,
    )

"""A deliberately faulty recovery server, to prove the harness catches a broken endpoint.

``python -m tests.conform.faulty_server server run --config server.toml`` runs the
reference stand-alone server with three faults patched in:

* **wrong error code**: a RelationshipOpen for a VM it holds no replica of is answered
  ``BUSY`` instead of ``UNKNOWN_VM`` (breaks REP-4, and DEL-2's "unknown afterwards");
* **accepts a bad length**: a control frame's length is allowed up to twice
  ``MAX_CONTROL_BODY`` (breaks ENV-4; absurd lengths are still refused, so the test does
  not make the process allocate gigabytes);
* **skips the version check**: any major version is taken to be ours (breaks NEG-2 and
  MSG-4: the server's own Connection will not send an answer that claims another major
  than the request's, so the connection ends without one);
* **no SNI is the broker**: a connection that sends no SNI is answered as a clustering
  broker (breaks TLS-12; connections with SNI, as every other scenario's, are not
  touched).
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import replace
from typing import Any

import frlink.accept
import frproto as fp
import frproto._connection as connection

FAULTS = ("wrong-error-code", "accepts-bad-length", "skips-version-check", "no-sni-is-the-broker")
#: The SNI of the connection this task accepts (each connection is a task of its own).
_SNI: contextvars.ContextVar[str | None] = contextvars.ContextVar("sni", default="")


def patch() -> None:
    # Wrong error code: every UnknownVM goes on the wire as BUSY.
    fp.UnknownVM.code = fp.ErrorCode.BUSY

    # Accepts a bad length: a looser limit for control frames.
    real_check = connection.check_envelope  # type: ignore[attr-defined]

    def lenient(reserved: int, tag: int, length: int, **limits: Any) -> None:
        if tag != fp.MessageTag.CHUNK:
            limits["max_control_body"] = 2 * fp.limits.MAX_CONTROL_BODY
        real_check(reserved, tag, length, **limits)

    connection.check_envelope = lenient  # type: ignore[attr-defined]

    # Skips the version check: the request's major is taken to be ours.
    real_answer = fp.answer_negotiation

    def careless(request: fp.NegotiateRequest, policy: fp.ServerPolicy) -> fp.NegotiateResponse:
        ours = (fp.limits.PROTOCOL_VERSION[0], request.version[1])
        return real_answer(fp.NegotiateRequest(ours, *_rest(request)), policy)

    fp.answer_negotiation = careless

    # No SNI is the broker: the accept loop asks for the SNI, then answers the request.
    real_requested_name = frlink.accept.requested_name  # type: ignore[attr-defined]

    def remember(stream: Any) -> str | None:
        name = real_requested_name(stream)
        _SNI.set(name)
        return name

    def broker_without_sni(
        request: fp.NegotiateRequest, policy: fp.ServerPolicy
    ) -> fp.NegotiateResponse:
        answer = careless(request, policy)
        if _SNI.get() is None:
            return replace(answer, recovery_type=fp.RecoveryType.CLUSTERING_BROKER)
        return answer

    frlink.accept.requested_name = remember  # type: ignore[attr-defined]
    fp.answer_negotiation = broker_without_sni


def _rest(request: fp.NegotiateRequest) -> tuple[Any, ...]:
    return (request.compression, request.encryption, request.auth_type)


if __name__ == "__main__":
    patch()
    from frctl.main import main

    sys.exit(main(sys.argv[1:]))

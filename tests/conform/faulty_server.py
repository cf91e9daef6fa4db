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
  touched);
* **sloppy RelationshipAccepted**: generation 0, and the resume point (0, 0) whatever
  the IR's state (breaks REP-24 and REP-26);
* **IR sequence ignored**: a completed IR is recorded at sequence 0, whatever its
  IRBegin said (breaks REP-25);
* **forgets IR progress**: a connection lost during an IR keeps only the last 256 MiB
  checkpoint, the behaviour before REP-27 (breaks REP-27);
* **refuses renames**: a create resent with another VM name is refused with EXISTS
  (breaks REP-28);
* **no repeat-only mode**: the former primary of a VM failed over by its planned
  failover is refused NOT_AUTHORIZED at the generation it knew too, so a request whose
  FailoverDone was lost cannot be asked again (breaks FOV-11, as the sloppy
  RelationshipAccepted also does: it would not carry the generation presented).
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
from dataclasses import replace
from typing import Any

import frlink.accept
import frproto as fp
import frproto._connection as connection

FAULTS = (
    "wrong-error-code",
    "accepts-bad-length",
    "skips-version-check",
    "no-sni-is-the-broker",
    "sloppy-accepted",
    "ir-sequence-ignored",
    "forgets-ir-progress",
    "refuses-renames",
    "no-repeat-only",
)
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

    _patch_relationships()


def _patch_relationships() -> None:
    from node.recovery_session import Session
    from node.storage import Replica

    # Sloppy RelationshipAccepted: generation 0, resume point (0, 0) in every state.
    real_send_accepted = Session._accept

    async def sloppy(self: Session, replica: Replica, *args: Any, **kwargs: Any) -> None:
        real_send = self.conn.send

        async def send(message: fp.Message) -> None:
            if isinstance(message, fp.RelationshipAccepted):
                message = dataclasses.replace(message, generation=0, resume_disk=0, resume_offset=0)
            await real_send(message)

        self.conn.send = send  # type: ignore[method-assign]
        try:
            await real_send_accepted(self, replica, *args, **kwargs)
        finally:
            del self.conn.send

    Session._accept = sloppy  # type: ignore[method-assign]

    # IR sequence ignored: every IR is recorded at sequence 0 (and acknowledged with its own).
    real_begin, real_complete = Replica.begin_ir, Replica.complete_ir

    def begin_at_zero(self: Replica, sequence: int) -> None:
        real_begin(self, 0)

    def complete_at_zero(self: Replica, sequence: int) -> None:
        real_complete(self, 0)

    Replica.begin_ir = begin_at_zero  # type: ignore[method-assign]
    Replica.complete_ir = complete_at_zero  # type: ignore[method-assign]

    # Forgets IR progress: nothing is kept when the connection ends during an IR.
    async def forget(self: Session) -> None:
        return None

    Session._keep_ir_progress = forget  # type: ignore[method-assign]

    # Refuses renames: a resent create with another name is EXISTS.
    real_create = Session.on_create

    async def strict(self: Session, msg: fp.RelationshipCreate) -> None:
        await self._check_owner(msg.vmid)
        if self.store.exists(msg.vmid) and self.store.open(msg.vmid).name != msg.vm_name:
            self._let_go()
            raise fp.AlreadyExists(f"a replica of {msg.vmid} with another name exists")
        await real_create(self, msg)

    Session.on_create = strict  # type: ignore[method-assign]

    # No repeat-only mode: a failed-over replica refuses its former primary at any
    # generation (the behaviour before FOV-11).
    import node.recovery_session

    def never(replica: Replica, generation: int, primary: str | None = None) -> bool:
        return False

    node.recovery_session.repeat_admissible = never  # type: ignore[attr-defined]


def _rest(request: fp.NegotiateRequest) -> tuple[Any, ...]:
    return (request.compression, request.encryption, request.auth_type)


if __name__ == "__main__":
    patch()
    from frctl.main import main

    sys.exit(main(sys.argv[1:]))

"""What an Error sent to a peer may say (docs/protocol.md, ERR-11).

Every Error that a recovery side (stand-alone server, cluster node, broker) builds from an
exception goes through :func:`wire_error`. Its text never carries the server's internals:

* a peer's violation found by frproto (:class:`frproto.RemoteProtocolError`) and a refusal
  (:class:`frproto.ReplicationError` other than INTERNAL) keep their ``message``, the
  text written for the peer; a ``detail`` (a path, the system's words) stays in the log;
* a failure of our own (INTERNAL, :class:`frproto.LocalProtocolError`, any other
  exception) gets a generic text with an incident id, and the log records the detail
  (with the traceback) under that id;
* as a last guard, a text that still holds something shaped like an absolute path is
  replaced the same way.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Final

import frproto as fp

#: An absolute POSIX path of two components or more, or a Windows drive path.
_PATH: Final = re.compile(r"(?:^|[\s'\"(=:,\[])/[^\s/'\"]+/|\b[A-Za-z]:\\")

#: The generic text per code when a refusal's own text cannot go out.
_GENERIC: Final[dict[fp.ErrorCode, str]] = {
    fp.ErrorCode.NO_SPACE: "no room on the storage for this",
    fp.ErrorCode.BUSY: "cannot take this now; try again later",
}


def incident_id() -> str:
    """A short random id that ties an Error's text to the log lines of its detail."""
    return secrets.token_hex(4)


def carries_internals(text: str) -> bool:
    """Whether ``text`` holds something shaped like a local path."""
    return _PATH.search(text) is not None


def wire_error(exc: BaseException, log: logging.Logger, *, what: str = "request") -> fp.Error:
    """The Error that reports ``exc`` to the peer (logging what the peer is not told).

    ``what`` names what failed, for the log ("RelationshipCreate", "query")."""
    if isinstance(exc, fp.FrprotoError) and exc.code is not fp.ErrorCode.INTERNAL:
        if not carries_internals(exc.message):
            return fp.Error.from_exception(exc)
        incident = incident_id()
        log.warning("incident %s: %s refused: %s", incident, what, exc)
        generic = _GENERIC.get(exc.code, "refused")
        return fp.Error.with_text(exc.code, f"{generic} (incident {incident})")
    incident = incident_id()
    if isinstance(exc, fp.FrprotoError):
        log.error("incident %s: %s failed: %s", incident, what, exc)
    else:
        log.error("incident %s: %s failed", incident, what, exc_info=exc)
    return fp.Error.with_text(
        fp.ErrorCode.INTERNAL,
        f"internal error (incident {incident}); the server's log has the detail",
    )

"""Session cookies and CSRF tokens, signed with HMAC-SHA256 (pure: no I/O).

A logged-in session is a cookie ``<payload>.<mac>``: the payload (base64 JSON: a random
session id, the user, its expiry) signed with the account's ``session_secret`` from the
cluster store, so that every node of the cluster accepts a session any node opened, and a
password change (a new secret) ends them all. Its CSRF token is the HMAC of the session
id: forms carry it, cookies cannot be read by a script (HttpOnly), and a page of another
site cannot learn it.

Before login there is no secret to sign with: the login form's token is a random value
also set as a cookie (double submit), compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Final

#: The session cookie's name; the pre-login cookie's.
SESSION_COOKIE: Final = "frrep_session"
LOGIN_COOKIE: Final = "frrep_login"
#: How long a session lasts from login (seconds).
SESSION_TTL: Final = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A logged-in administrator's session."""

    sid: str
    user: str
    expires: float


def _mac(secret: str, data: bytes) -> str:
    digest = hmac.new(bytes.fromhex(secret), data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_session(secret: str, user: str, now: float) -> tuple[Session, str]:
    """A new session for ``user`` and its cookie value."""
    session = Session(secrets.token_urlsafe(18), user, now + SESSION_TTL)
    payload = json.dumps({"sid": session.sid, "user": user, "exp": session.expires}).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return session, f"{body}.{_mac(secret, body.encode())}"


def open_session(secret: str, cookie: str | None, now: float) -> Session | None:
    """The session a cookie holds, if it is signed with ``secret`` and not expired."""
    if not cookie or "." not in cookie:
        return None
    body, mac = cookie.rsplit(".", 1)
    if not hmac.compare_digest(mac, _mac(secret, body.encode())):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        session = Session(str(data["sid"]), str(data["user"]), float(data["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires > now else None


def csrf_token(secret: str, session: Session) -> str:
    """The CSRF token of a session's forms."""
    return _mac(secret, b"csrf:" + session.sid.encode())


def tokens_match(a: str | None, b: str | None) -> bool:
    """Two tokens are both given and equal (in constant time)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def new_login_token() -> str:
    """The pre-login double-submit token."""
    return secrets.token_urlsafe(24)

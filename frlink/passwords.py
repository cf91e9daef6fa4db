"""Password hashes for people (the web console's administrator): scrypt from the standard
library, in a self-describing text form ``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64), so
that the cost can be raised later while old hashes still verify.

scrypt rather than Argon2: it is in :mod:`hashlib` (no compiled dependency to install),
memory-hard, and OWASP lists it with these parameters (N=2**15, r=8, p=1: 32 MiB, about
0.1 s here). Verifying is blocking CPU work: callers on Trio run it in a thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

__all__ = ["hash_password", "verify_password"]

_N: Final = 2**15
_R: Final = 8
_P: Final = 1
_LEN: Final = 32


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=_LEN
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """The text to store for ``password`` (a fresh random salt each time)."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (from :func:`hash_password`) was made
    from; ``False`` for a malformed ``stored`` too."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or int(n) > 2**20:
            return False
        mine = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
        return hmac.compare_digest(mine, _unb64(digest))
    except ValueError:
        return False

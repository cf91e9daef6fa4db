"""Authorization entries: which primary servers may replicate here, and where their replicas go.

An entry names a primary by exact host name or by a ``*.domain`` pattern (any depth
below the domain), the storage location for its replicas and its trust group. The most
specific entry wins: an exact name over a pattern, a longer pattern over a shorter one.
"Any authenticated primary" is possible only as an explicit, separate option.

A relationship is bound to the trust group of the primary that created it: a primary of
the same trust group may carry it on (the VM moved between primary hosts); any other is
refused (:meth:`Authorization.check_binding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from frproto import NotAuthorized

from .identity import PrimaryIdentity


@dataclass(frozen=True, slots=True)
class AuthorizationEntry:
    """One authorized primary (or pattern of primaries)."""

    primary: str
    storage: Path
    trust_group: str

    def __post_init__(self) -> None:
        pattern = self.primary.lower()
        if (
            not pattern
            or "*" in pattern[1:]
            or (pattern.startswith("*") and not pattern.startswith("*."))
        ):
            raise ValueError(f"primary pattern {self.primary!r}: use a host name or *.domain")
        if not self.trust_group:
            raise ValueError("an authorization entry needs a trust group")

    def specificity(self, name: str) -> int:
        """How well this entry matches ``name``: -1 for no match, higher is more specific."""
        pattern, host = self.primary.lower(), name.lower().rstrip(".")
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.com"
            return len(suffix) if host.endswith(suffix) and len(host) > len(suffix) else -1
        return 10_000 if host == pattern.rstrip(".") else -1


@dataclass(frozen=True, slots=True)
class Grant:
    """What authorization gave a connection: who it is and where its replicas live."""

    identity: PrimaryIdentity
    storage: Path


@dataclass(frozen=True, slots=True)
class Authorization:
    """The authorization entries of a recovery server.

    Attributes:
        entries: the entries, in any order.
        any_primary: if set, admits any primary with a valid certificate from our CA
            (the explicit "any authenticated primary" option), with this storage and group.
    """

    entries: tuple[AuthorizationEntry, ...] = ()
    any_primary: AuthorizationEntry | None = None

    def authorize(self, peer_names: Sequence[str]) -> Grant:
        """The grant for a peer whose certificate carries ``peer_names``.

        Raises:
            NotAuthorized: no entry matches any of the names.
        """
        best: tuple[int, AuthorizationEntry, str] | None = None
        for name in peer_names:
            for entry in self.entries:
                score = entry.specificity(name)
                if score >= 0 and (best is None or score > best[0]):
                    best = (score, entry, name)
        if best is not None:
            _, entry, name = best
            return Grant(PrimaryIdentity(name, entry.trust_group), entry.storage)
        if self.any_primary is not None and peer_names:
            entry = self.any_primary
            return Grant(PrimaryIdentity(peer_names[0], entry.trust_group), entry.storage)
        shown = ", ".join(peer_names) or "(no names in the certificate)"
        raise NotAuthorized(f"primary {shown} is not authorized on this recovery server")

    @staticmethod
    def check_binding(identity: PrimaryIdentity, bound_trust_group: str, what: str) -> None:
        """Refuse a primary outside the trust group a relationship is bound to."""
        if identity.trust_group != bound_trust_group:
            raise NotAuthorized(
                f"{what} is bound to trust group {bound_trust_group!r}; primary "
                f"{identity.name} is in {identity.trust_group!r}"
            )

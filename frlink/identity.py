"""Who a primary server is, as the recovery side knows it after mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PrimaryIdentity:
    """An authenticated primary server.

    Attributes:
        name: the primary's host name, from its certificate (first DNS SAN).
        trust_group: the trust group the authorization entry that admitted it gives.
    """

    name: str
    trust_group: str

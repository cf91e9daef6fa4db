"""The scenarios, by area; importing this package registers them all, in this order."""

from . import broker, errors, malformed, negotiation, relationship, replication, transport  # noqa: F401

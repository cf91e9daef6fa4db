"""The scenarios, by area; importing this package registers them all, in this order."""

from . import broker, malformed, negotiation, replication  # noqa: F401

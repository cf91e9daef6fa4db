"""The scenarios, by area; importing this package registers them all, in this order."""

from . import (  # noqa: F401
    broker,
    deadlines,
    errors,
    failover,
    malformed,
    negotiation,
    relationship,
    replication,
    transport,
    trust_groups,
)

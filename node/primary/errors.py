"""How replication of a VM stops or fails: what only a person can resolve, and what a
later cycle may get past."""

from __future__ import annotations

import trio

from frlink.tls import TLSFailure


class ReplicationHalted(Exception):
    """Replication of a VM cannot go on without a person (deleted replica, lost data)."""


#: A peer that cannot be reached (or stopped answering): retryable.
UNREACHABLE = (OSError, TLSFailure, trio.BrokenResourceError, trio.TooSlowError)

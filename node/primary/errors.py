"""How replication of a VM stops or fails: what only a person can resolve, and what a
later cycle may get past."""

from __future__ import annotations

import trio

from frlink.tls import TLSFailure


class ReplicationHalted(Exception):
    """Replication of a VM cannot go on without a person (deleted replica, lost data)."""


#: A peer that cannot be reached (or stopped answering): retryable.
UNREACHABLE = (OSError, TLSFailure, trio.BrokenResourceError, trio.TooSlowError)


class FailoverInDoubt(ReplicationHalted):
    """A planned failover's request was sent and its answer lost (the connection broke, or
    timed out): the recovery side may have taken the VM over, or not. Recorded in the
    VM's state (``failover_in_doubt``); the VM is replicated no more until the request
    is run again (``frctl failover planned VMID``) and answered, or an operator decides
    (``frctl replication resume VMID``). See ``docs/failover.md``."""

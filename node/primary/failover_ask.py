"""A planned failover asked at the recovery side: the primary's answer (protocol 1.1).

``frctl cluster failover --planned VMID`` cannot reach the primary (the broker never
connects to one): the VM's node answers the primary's next RelationshipOpen with a
FailoverAsk just before RelationshipAccepted (``docs/protocol.md`` 4.21). After the
session's pending cycles are sent, the primary answers (:func:`answer_ask`):

* it **declines** (FailoverDecline, with the reason, 4.22) when it has no way to stop the
  VM without a person (no ``[failover] stop_command``: :data:`NO_STOP_HOOK`) or its stop
  hook failed, and carries on replicating (FOV-15);
* else, the VM's writes stopped, it **hands the VM over** once the cycle is done: the
  same flow as ``frctl failover planned`` (last cycle, state digest, FailoverRequest,
  and reverse replication when configured), through :class:`FailoverAskHandler`, which
  the service is given from above (``node/failover/asked.py``: the workflows stand on
  this floor, not under it). A hand-over that fails is declined at the next ask.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .client import RecoveryClient

log = logging.getLogger("frrep.primary")

#: The reason given when the primary has no stop hook to stop the VM with.
NO_STOP_HOOK = (
    "no stop hook is configured at the primary ([failover] stop_command): the VM cannot "
    "be stopped without a person; run 'frctl failover planned' there"
)


class FailoverAskHandler(Protocol):
    """How a primary carries out a planned failover asked at the recovery side."""

    async def stop(self, vmid: uuid.UUID, disks: list[Path]) -> str | None:
        """Stop the VM's writes (the stop hook); None once they are, else why not."""
        ...

    async def hand_over(self, replicator: Any) -> None:
        """The VM's writes stopped: fail it over (last cycle, FailoverRequest) through
        ``replicator`` (a :class:`node.primary.replicator.VMReplicator`).

        Raises:
            Exception: the failover was not done (the replicator declines the next ask).
        """
        ...


@dataclass
class AskState:
    """Where one VM's primary stands with an ask."""

    #: The stop hook ran: the replicator hands the VM over after this cycle.
    handing_over: bool = False
    #: Why the next ask is declined (a hand-over that failed), if so.
    decline_next: str | None = None


async def answer_ask(
    handler: FailoverAskHandler | None,
    state: AskState,
    client: RecoveryClient,
    vmid: uuid.UUID,
    disks: list[Path],
    *,
    not_ready: str | None = None,
) -> None:
    """Answer the FailoverAsk of ``client``'s session for ``vmid``, if one came (in
    SESSION, nothing in flight). Nothing is sent when the stop hook ran: the hand-over
    that follows answers it (a FailoverRequest). ``not_ready``: why the VM cannot be
    handed over now (its initial replication is not done): declined before it is
    stopped."""
    if client.failover_asked != vmid or state.handing_over:
        return  # not asked, or asked again by the hand-over's own connections
    reason, state.decline_next = state.decline_next or not_ready, None
    if reason is None:
        reason = NO_STOP_HOOK if handler is None else await handler.stop(vmid, disks)
    if reason is not None:
        log.warning("planned failover of %s asked by the recovery side: declined: %s", vmid, reason)
        await client.decline_failover(vmid, reason)
        return
    log.info("planned failover of %s asked by the recovery side: VM stopped, handing over", vmid)
    state.handing_over = True

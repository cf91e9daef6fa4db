"""A planned failover asked at the recovery side, carried out by the primary service.

``frctl cluster failover --planned VMID`` has the VM's node send the primary a
FailoverAsk on its next connection (protocol 1.1). The primary service answers it
(``node/primary/failover_ask.py``) through :class:`AskedFailover`, made from the
primary's ``[failover]`` configuration: its stop hook stops the VM (a hook that fails:
declined), then the VM is handed over exactly as ``frctl failover planned`` does
(:func:`node.failover.planned.planned_failover`: last cycle, state digest,
FailoverRequest, and, with this host's recovery server configured, reverse replication).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frlink.authz import Authorization

from .planned import planned_failover, run_stop_hook
from .test import HookFailed


@dataclass(frozen=True)
class AskedFailover:
    """The primary's way to carry out an asked planned failover (a
    :class:`node.primary.failover_ask.FailoverAskHandler`).

    Attributes:
        stop_command: the stop hook (``[failover] stop_command``).
        authorization: this host's recovery server's authorization (its replica of the
            VM is made there, reverse replication's target); None: no reverse.
        reverse_port: that server's port (0: none).
    """

    stop_command: str
    authorization: Authorization | None = None
    reverse_port: int = 0

    async def stop(self, vmid: uuid.UUID, disks: list[Path]) -> str | None:
        """Run the stop hook; None when it succeeded, else its failure (declined)."""
        try:
            await run_stop_hook(self.stop_command, vmid, disks)
        except HookFailed as exc:
            return str(exc)
        return None

    async def hand_over(self, replicator: Any) -> None:
        """Fail the VM over (its writes stopped): ``frctl failover planned``'s flow."""
        await planned_failover(
            replicator,
            stop_command=None,  # ran already, answering the ask
            authorization=self.authorization,
            reverse_port=0 if self.authorization is None else self.reverse_port,
        )

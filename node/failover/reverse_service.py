"""Reverse replication that starts by itself after a planned failover (FOV-9).

A stand-alone recovery server that took a VM over (``node/takeover.py``) is where
the VM runs now; when the FailoverRequest named a ``reverse_port``, it replicates the VM
back to the former primary's own recovery server (at the connection's peer address,
named as the primary's certificate), at the new generation, from the replica's image
files, differences first (:func:`node.failover.reverse.reverse_state`).

The recovery server runs a primary service of its own for these VMs
(:func:`node.primary.service.run_primary`) on a state directory beside its storage, with
its own TLS identity: :meth:`ReverseReplication.taken_over` writes the VM's replication
state there and the service picks it up within its poll interval, as it does any VM
enabled with ``frctl replication enable``. ``frctl replication status --config`` on a
primary configuration that names that directory shows it.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import trio

from frlink.config import TLSFiles
from node.primary.config import PrimaryConfig
from node.primary.service import run_primary
from node.primary.state import PrimaryStateStore

from .reverse import reverse_state

log = logging.getLogger("frrep.failover")


def reverse_state_dir(storages: list[Path]) -> Path:
    """Where a recovery server with these storage locations keeps the replication state
    of the VMs it replicates back: ``reverse-primary`` beside its first storage location
    (in the working directory when it has none)."""
    if not storages:
        return Path("reverse-primary").resolve()
    return sorted(storages)[0].parent / "reverse-primary"


class ReverseReplication:
    """The reverse replication of a recovery server's taken-over VMs."""

    def __init__(
        self, *, name: str, tls: TLSFiles, listen: str, state_dir: Path, frequency_s: float
    ) -> None:
        """The server's ``name``, ``tls`` identity and ``listen`` address (its connections'
        source), the state directory (:func:`reverse_state_dir`; a cluster node's is
        under its storage root) and the seconds between cycles."""
        self.name, self.tls, self.listen = name, tls, listen
        self.state_dir = state_dir
        self.frequency_s = frequency_s
        #: Set once there is a VM to replicate back (the service starts then: a server
        #: that never took a VM over keeps no directory for it).
        self._wanted = trio.Event()

    def primary_config(self) -> PrimaryConfig:
        """The primary service's configuration: this server's name, TLS identity and
        listening address (the source of its connections)."""
        listen = self.listen
        return PrimaryConfig(
            name=self.name,
            state_dir=self.state_dir,
            tls=self.tls,
            local_address=None if listen in ("0.0.0.0", "::", "") else listen,
        )

    async def taken_over(
        self,
        vmid: uuid.UUID,
        *,
        storage: Path,
        primary_name: str,
        primary_address: str | None,
        reverse_port: int,
    ) -> None:
        """Enable the reverse replication of a VM just taken over, whose replica is in
        ``storage``, to the recovery server at ``primary_address:reverse_port`` named
        ``primary_name`` (a no-op without a port or an address)."""
        if not reverse_port or not primary_address:
            log.info(
                "VM %s taken over; no reverse replication (port %d, peer address %s)",
                vmid,
                reverse_port,
                primary_address,
            )
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = await trio.to_thread.run_sync(
            lambda: reverse_state(
                PrimaryStateStore(self.state_dir),
                storage,
                vmid,
                host=primary_address,
                port=reverse_port,
                server_name=primary_name,
                frequency_s=self.frequency_s,
            )
        )
        log.info(
            "VM %s (%s): replicating back to %s (%s:%d), differences first",
            vmid,
            state.name,
            primary_name,
            primary_address,
            reverse_port,
        )
        self._wanted.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the primary service of the reversed VMs until cancelled (from the first VM
        taken over, or at once when an earlier run left some)."""
        task_status.started()
        if not self.state_dir.is_dir():
            await self._wanted.wait()
        await run_primary(self.primary_config())

"""A test site on loopback: a CA, host certificates, a recovery server process, a primary.

Distinct 127.x addresses stand in for distinct hosts: the recovery server listens on
127.0.0.2 and the primary connects from 127.0.0.3.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from frlink.certs import create_ca, issue_host_cert
from frlink.tls import client_context
from frtesting.replicas import applied_image
from frtesting.server import ServerProcess, start_server_process
from node.primary.replicator import VMReplicator
from node.primary.state import PrimaryStateStore, VMReplicationState
from node.storage.layout import ReplicaLayout

SERVER_HOST = "127.0.0.2"
PRIMARY_HOST = "127.0.0.3"
SERVER_NAME = "r1.example.com"
PRIMARY_NAME = "p1.primary.example.com"


@dataclass
class Site:
    """Certificates, configs and directories of one loopback test site."""

    root: Path
    storage: Path = field(init=False)
    certs: Path = field(init=False)
    server_config: Path = field(init=False)
    state_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.certs = self.root / "certs"
        self.storage = self.root / "replicas"
        self.state_dir = self.root / "primary-state"
        self.server_config = self.root / "server.toml"
        create_ca(self.certs)
        issue_host_cert(self.certs, self.certs, SERVER_NAME, ip_addresses=[SERVER_HOST])
        issue_host_cert(self.certs, self.certs, PRIMARY_NAME, ip_addresses=[PRIMARY_HOST])
        self.write_server_config()

    def write_server_config(
        self,
        *,
        port: int = 0,
        primary: str = "*.primary.example.com",
        trust_group: str = "site-a",
        connections: str = "",
        authorization: str = "",
    ) -> None:
        """Write ``server.toml``; ``connections``: the body of a ``[connections]`` table
        (deadlines and bounds), none when empty; ``authorization``: more
        ``[[authorization]]`` tables, as TOML."""
        self.server_config.write_text(
            f"""
[server]
name = "{SERVER_NAME}"
listen = "{SERVER_HOST}"
port = {port}
recovery_points = 4

[tls]
cert = "certs/{SERVER_NAME}.pem"
key = "certs/{SERVER_NAME}-key.pem"
ca = "certs/ca.pem"

[[authorization]]
primary = "{primary}"
storage = "replicas"
trust_group = "{trust_group}"
"""
            + (f"\n{authorization}\n" if authorization else "")
            + (f"\n[connections]\n{connections}\n" if connections else "")
        )

    def start_server(self, *, port: int | None = None, timeout: float = 20.0) -> ServerProcess:
        """Start the recovery server process and wait until it listens.

        ``port`` rewrites the config for that port (to restart on the same one); None keeps
        the config as it is (port 0: any free port)."""
        if port is not None:
            self.write_server_config(port=port)
        return start_server_process(self.server_config, self.root, timeout=timeout)

    def write_primary_config(self) -> Path:
        """The primary's TOML file (state in ``state_dir``, source address 127.0.0.3)."""
        path = self.root / "primary.toml"
        path.write_text(
            f"""
[primary]
name = "{PRIMARY_NAME}"
state_dir = "{self.state_dir.name}"
local_address = "{PRIMARY_HOST}"

[tls]
cert = "certs/{PRIMARY_NAME}.pem"
key = "certs/{PRIMARY_NAME}-key.pem"
ca = "certs/ca.pem"
"""
        )
        return path

    def client_context(self, name: str = PRIMARY_NAME):  # type: ignore[no-untyped-def]
        return client_context(
            self.certs / f"{name}.pem", self.certs / f"{name}-key.pem", self.certs / "ca.pem"
        )

    def replicator(
        self,
        vmid: uuid.UUID,
        name: str,
        images: list[Path],
        port: int,
        *,
        block_size: int = 65536,
        host: str = SERVER_HOST,
    ) -> VMReplicator:
        """A replicator for a VM whose disks are ``images``, to the server at ``port``
        (of ``host``: another address when a test puts a proxy in between)."""
        store = PrimaryStateStore(self.state_dir)
        state = VMReplicationState(
            vmid=str(vmid),
            name=name,
            disks=[
                {"disk_id": f"disk{i}", "path": str(p), "size": p.stat().st_size}
                for i, p in enumerate(images)
            ],
            block_size=block_size,
            recovery_host=host,
            recovery_port=port,
            server_name=SERVER_NAME,
            frequency_s=1.0,
        )
        store.save(state)
        return VMReplicator(state, store, self.client_context(), local_address=PRIMARY_HOST)

    def restarted(self, replicator: VMReplicator, **options: object) -> VMReplicator:
        """A new replicator from ``replicator``'s persisted state, as after a primary
        restart (``options``: VMReplicator fields, e.g. a tracker)."""
        return VMReplicator(
            replicator.store.load(replicator.state.vmid),
            replicator.store,
            self.client_context(),
            local_address=PRIMARY_HOST,
            **options,  # type: ignore[arg-type]
        )

    def replica_image(self, vmid: uuid.UUID, disk_index: int, *, applied: bool = True) -> Path:
        """The replica's image file of one disk on the recovery server; with ``applied``,
        once the last acknowledged batch is applied to it (the server applies after the
        Ack: ``frtesting.replicas``)."""
        if applied:
            return applied_image(self.storage, vmid, f"disk{disk_index}")
        return ReplicaLayout(self.storage, vmid).image(f"disk{disk_index}")

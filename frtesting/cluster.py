"""A whole cluster on one machine (loopback): a CA, node certificates and configs, node
processes, and a primary's view of it. The demo runs on it, and so do the cluster tests.

Each node is a real ``frctl node run`` process on its own address (127.0.0.11, .12, ...);
the CAP has an address of its own (127.0.0.10) that whichever node holds the election
binds (or none: ``dns_cap``). The store is a SQLite file in the site (the embedded
default), or an etcd URL.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import trio

import frproto as fp
from broker.records import Keys, Settings
from broker.store import open_store
from frlink.certs import create_ca, issue_host_cert
from frlink.tls import TLSFailure, client_context
from node.primary.client import RecoveryClient
from node.primary.replicator import VMReplicator

from .server import child_env

CAP_NAME = "cap.example.com"
CAP_ADDRESS = "127.0.0.10"
PRIMARY_NAME = "p1.primary.example.com"
PRIMARY_ADDRESS = "127.0.0.3"
#: A primary of another trust group (``tg-other``, storage ``replicas-other``) when the
#: settings admit it (:meth:`ClusterSite.authorize_primary` with ``other_group``).
OTHER_GROUP_NAME = "p2.other.example.org"
_UP = re.compile(r"node \S+ up at \S+:(\d+)")
_CONSOLE = re.compile(r"console at https://\S+:(\d+)/")
_CAP_CONSOLE = re.compile(r"console at the CAP's https://\S+:(\d+)/")
_BROKER = re.compile(r"broker serving at the CAP .*, ([0-9.]+) s after the election")


def node_name(i: int) -> str:
    """The FQDN of node ``i`` (1-based)."""
    return f"n{i}.example.com"


def node_address(i: int) -> str:
    """The loopback address of node ``i``."""
    return f"127.0.0.{10 + i}"


def free_port(host: str) -> int:
    """A port free on ``host`` now (for the CAP, which every node must agree on)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """One running node agent."""

    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    #: The web console's port (0: the site has no console).
    console_port: int = 0

    @property
    def name(self) -> str:
        return node_name(self.index)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@dataclass
class ClusterSite:
    """Certificates, configs and node processes of one loopback cluster under ``root``."""

    root: Path
    nodes: int = 4
    store_url: str = ""
    prefix: str = field(default_factory=lambda: f"/c-{uuid.uuid4().hex[:8]}/")
    shared_storage: bool = False
    lease_ttl: float = 1.0
    cap_port: int = 0
    #: No CAP address of its own: the broker's node answers for the CAP's name by SNI
    #: (a deployment that moves the CAP with DNS).
    dns_cap: bool = False
    #: Each node's ``failover_start`` hook (a shell command; "" for none).
    failover_start: str = ""
    #: Each node's ``failover_stop`` hook (a cancelled failover's; "" for none).
    failover_stop: str = ""
    #: Each node serves the web console (``[console]``, on a port of its own).
    console: bool = False
    #: The body of each node's ``[connections]`` table (deadlines and bounds); "": none.
    connections: str = ""
    running: dict[int, NodeProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.certs = self.root / "certs"
        create_ca(self.certs)
        for i in range(1, self.nodes + 1):
            issue_host_cert(
                self.certs,
                self.certs,
                node_name(i),
                extra_names=[CAP_NAME],
                ip_addresses=[node_address(i), CAP_ADDRESS],
            )
        issue_host_cert(self.certs, self.certs, PRIMARY_NAME, ip_addresses=[PRIMARY_ADDRESS])
        issue_host_cert(self.certs, self.certs, OTHER_GROUP_NAME, ip_addresses=[PRIMARY_ADDRESS])
        if not self.store_url:
            self.store_url = f"sqlite://{self.root / 'cluster.db'}"
        if not self.cap_port:
            self.cap_port = free_port(CAP_ADDRESS)
        self.shared = self.root / "shared-storage"
        for i in range(1, self.nodes + 1):
            self.write_config(i)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def storage(self, i: int) -> Path:
        """Node ``i``'s storage root."""
        return self.shared if self.shared_storage else self.root / f"storage-{i}"

    def config_path(self, i: int) -> Path:
        return self.root / f"node{i}.toml"

    def write_config(self, i: int) -> None:
        name = node_name(i)
        storage = self.storage(i)
        self.config_path(i).write_text(
            f"""
[node]
name = "{name}"
listen = "{node_address(i)}"
port = 0
storage = "{storage}"
shared_storage = {"true" if self.shared_storage else "false"}
failover_start = {json.dumps(self.failover_start)}
failover_stop = {json.dumps(self.failover_stop)}

[cluster]
store = "{self.store_url}"
prefix = "{self.prefix}"
cap_name = "{CAP_NAME}"
cap_address = "{"" if self.dns_cap else CAP_ADDRESS}"
cap_port = {self.cap_port}
lease_ttl = {self.lease_ttl}
{"[console]" + chr(10) + "port = 0" if self.console else ""}

[tls]
cert = "certs/{name}.pem"
key = "certs/{name}-key.pem"
ca = "certs/ca.pem"
"""
            + (f"\n[connections]\n{self.connections}\n" if self.connections else "")
        )

    def start(self, i: int, *, timeout: float = 20.0) -> NodeProcess:
        """Start node ``i`` and wait until it serves."""
        log = self.root / f"node{i}-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "frctl",
                    "node",
                    "run",
                    "--config",
                    str(self.config_path(i)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _UP.search(log.read_text(errors="replace"))
            if match:
                console = _CONSOLE.search(log.read_text(errors="replace"))
                node = NodeProcess(
                    i, proc, log, int(match.group(1)), int(console.group(1)) if console else 0
                )
                self.running[i] = node
                return node
            if proc.poll() is not None:
                raise RuntimeError(f"node {i} exited: {log.read_text()}")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"node {i} did not start: {log.read_text()}")

    def start_all(self) -> None:
        for i in range(1, self.nodes + 1):
            self.start(i)

    def stop_all(self) -> None:
        for node in list(self.running.values()):
            node.kill()
        self.running.clear()

    def broker_node(self, *, timeout: float = 10.0) -> NodeProcess:
        """The running node that serves the broker now (waits for one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.running.values():
                if node.proc.poll() is None and _BROKER.search(node.text()):
                    holder = trio.run(self.holder)
                    if holder == node.name:
                        return node
            time.sleep(0.05)
        raise RuntimeError("no broker elected")

    def cap_console_port(self, node: NodeProcess, *, timeout: float = 10.0) -> int:
        """The port of the console ``node`` serves at the CAP's address (it runs the
        broker); the last one it logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _CAP_CONSOLE.findall(node.text())
            if found:
                return int(found[-1])
            time.sleep(0.05)
        raise RuntimeError(f"{node.name} serves no console at the CAP")

    async def holder(self) -> str | None:
        from broker.election import current_holder

        async with open_store(self.store_url) as store:
            record = await current_holder(store, self.keys)
        return None if record is None else record.holder

    async def set_settings(self, settings: Settings) -> None:
        async with open_store(self.store_url) as store:
            await store.put(self.keys.settings, settings.to_json())

    def authorize_primary(self, *, other_group: bool = False, **extra: object) -> Settings:
        """Settings admitting the test primary (trust group tg), plus ``extra``;
        ``other_group``: also :data:`OTHER_GROUP_NAME`, in trust group tg-other with storage
        of its own."""
        authorization = [
            {"primary": "*.primary.example.com", "storage": "replicas", "trust_group": "tg"}
        ]
        if other_group:
            other = {"primary": OTHER_GROUP_NAME, "trust_group": "tg-other"}
            authorization.append({**other, "storage": "replicas-other"})
        settings = Settings(
            authorization=authorization,
            **extra,  # type: ignore[arg-type]
        )
        trio.run(self.set_settings, settings)
        # Nodes already running apply it within moments (they log it): wait, so that the
        # test's first connection does not race the settings watch.
        deadline = time.monotonic() + 10
        for node in self.running.values():
            while "setting authorization changed" not in node.text():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} did not apply the settings")
                time.sleep(0.02)
        # The broker's own view of the settings (broker/cluster_cache.py) follows the store
        # by its own watch: wait until the CAP admits the primary too.
        if settings.recovery_enabled:
            trio.run(self._cap_admits_primary, deadline)
        return settings

    async def _cap_admits_primary(self, deadline: float) -> None:
        """Negotiate at the CAP as the test primary until it is admitted; returns at once
        when no broker answers at the CAP (a cluster not started yet)."""
        while True:
            try:
                client = await self._connect_as_primary((CAP_ADDRESS, self.cap_port), timeout=2.0)
            except fp.NotAuthorized:
                if time.monotonic() > deadline:
                    raise RuntimeError("the broker did not apply the settings") from None
                await trio.sleep(0.02)
                continue
            except (OSError, TLSFailure):
                return
            await client.aclose()
            return

    async def _connect_as_primary(
        self, address: tuple[str, int], *, timeout: float = 15.0
    ) -> RecoveryClient:
        """Connect and negotiate as the test primary, asking for the CAP's name (SNI)."""
        return await RecoveryClient.connect(
            *address,
            server_name=CAP_NAME,
            ssl_context=self.primary_context(),
            local_address=PRIMARY_ADDRESS,
            timeout=timeout,
        )

    def primary_context(self, name: str = PRIMARY_NAME) -> ssl.SSLContext:
        """The test primary's client TLS context (or that of the primary ``name``)."""
        certs = self.certs
        return client_context(certs / f"{name}.pem", certs / f"{name}-key.pem", certs / "ca.pem")

    async def query(
        self,
        vmid: uuid.UUID,
        *,
        name: str = "vm",
        sizes: tuple[int, ...] = (1 << 20,),
        at: tuple[str, int] | None = None,
    ) -> fp.QueryRecoveryServerResponse:
        """Ask the broker at the CAP where ``vmid`` lives (as the test primary); ``at``:
        connect to that address and port instead of the CAP's own, still asking for the
        CAP's name (SNI)."""
        host, port = at or (CAP_ADDRESS, self.cap_port)
        client = await self._connect_as_primary((host, port))
        try:
            if client.negotiated.recovery_type is not fp.RecoveryType.CLUSTERING_BROKER:
                raise fp.UnexpectedMessage(f"{host}:{port} is not a clustering broker")
            await client.conn.send(fp.QueryRecoveryServer(vmid, name, sizes))
            answer = await client.conn.expect(fp.QueryRecoveryServerResponse)
            return cast("fp.QueryRecoveryServerResponse", answer)
        finally:
            await client.aclose()


def replica_path(site: ClusterSite, i: int, vmid: uuid.UUID, disk: int = 0) -> Path:
    """Where node ``i`` keeps disk ``disk`` of the replica of ``vmid``, once the last
    acknowledged batch is applied to it (``frtesting.replicas``)."""
    from .replicas import applied_image

    return applied_image(site.storage(i) / "replicas", vmid, f"disk{disk}")


def primary_replicator(site: ClusterSite, vmid: uuid.UUID, images: list[Path]) -> VMReplicator:
    """A VMReplicator of the test primary, configured with the CAP as its server."""
    from node.primary.state import PrimaryStateStore, VMReplicationState

    store = PrimaryStateStore(site.root / "primary-state")
    state = VMReplicationState(
        vmid=str(vmid),
        name=f"vm-{vmid.hex[:6]}",
        disks=[
            {"disk_id": f"disk{i}", "path": str(p), "size": p.stat().st_size}
            for i, p in enumerate(images)
        ],
        block_size=65536,
        recovery_host=CAP_ADDRESS,
        recovery_port=site.cap_port,
        server_name=CAP_NAME,
        frequency_s=0.2,
    )
    store.save(state)
    hosts = {node_name(i): node_address(i) for i in range(1, site.nodes + 1)}
    hosts[CAP_NAME] = CAP_ADDRESS
    return VMReplicator(
        state,
        store,
        site.primary_context(),
        local_address=PRIMARY_ADDRESS,
        hosts=hosts,
    )

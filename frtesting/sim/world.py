"""One simulated site: a stand-alone recovery server and primaries with changing disks.

Every piece is the production code: :class:`node.recovery_server.RecoveryServer` (its
storage engine writing real files through a :class:`frtesting.powerloss.RecordingFileIO`,
so a power cut can drop what was not synced), :class:`node.primary.replicator.
VMReplicator` per VM, mutual TLS over :mod:`frtesting.sim.network`. Only the world around
them is simulated: the hosts (Trio cancel scopes killed and started again), the network,
the VMs writing to their disks, and the clock (Trio's ``MockClock``, driven by the
runner).

The world also keeps what the invariants need (``frtesting/sim/invariants.py``): the
highest acknowledged sequence of each VM seen before every fault, and a copy of each
VM's disks at every capture.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import shutil
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from frlink import network
from frlink.authz import Authorization, AuthorizationEntry
from frlink.certs import create_ca, issue_host_cert
from frlink.tls import client_context, server_context
from frtesting.powerloss import CrashStates, RecordingFileIO
from node.config import RecoveryServerConfig, TLSFiles
from node.primary import durable
from node.primary.replicator import VMReplicator
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState
from node.recovery_server import RecoveryServer

from .network import SimNetwork

log = logging.getLogger("frrep.sim")


class HostDied(BaseException):
    """The simulated host died at this system call (a ``BaseException``: no handler of
    the production code takes it for an I/O error it could answer)."""


class HostFiles(RecordingFileIO):
    """The file layer of one simulated host's life: records every change (so that a power
    cut can drop what was not synced) and, once the host is :attr:`dead`, refuses every
    change: a killed process makes no more system calls, though its Trio tasks still run
    their cleanup when the simulation cancels them.

    :meth:`trip` arms a death at a system call: the ``count``-th change from now raises
    :class:`HostDied` instead of happening (a crash in the middle of a commit or an
    apply, which a fault at a random time would seldom hit)."""

    dead = False
    #: The storage is full: every write fails with ENOSPC (the engine answers NO_SPACE).
    full = False
    trip_at = -1
    on_trip: Callable[[], None] | None = None

    def trip(self, count: int, on_trip: Callable[[], None]) -> None:
        self.trip_at, self.on_trip = len(self.ops) + count, on_trip

    def disarm(self) -> None:
        self.trip_at, self.on_trip = -1, None

    def _before(self, name: str) -> None:
        if self.dead:
            raise OSError(errno.EIO, f"{name}: the simulated host is dead")
        if self.full and name in _WRITES:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        if 0 <= self.trip_at <= len(self.ops):
            self.dead = True
            on_trip, self.on_trip = self.on_trip, None
            if on_trip is not None:
                on_trip()
            raise HostDied(name)


_WRITES = frozenset({"pwrite", "writev", "write_zeros", "copy_range", "reserve"})


def _refused_when_dead(name: str) -> Any:
    def call(self: HostFiles, *args: Any, **kwargs: Any) -> Any:
        self._before(name)
        return getattr(RecordingFileIO, name)(self, *args, **kwargs)

    call.__name__ = name
    return call


for _name in (
    "open",
    "mkdir",
    "remove_tree",
    "rename",
    "unlink",
    "pwrite",
    "writev",
    "write_zeros",
    "copy_range",
    "reserve",
    "truncate",
    "fsync",
    "fdatasync",
    "fsync_dir",
):
    setattr(HostFiles, _name, _refused_when_dead(_name))


def power_cut(
    io: RecordingFileIO, point: int, rng: random.Random, root: Path, scratch: Path
) -> str:
    """Replace ``root`` by one disk state a power cut before operation ``point`` of
    ``io`` may leave (drawn by ``rng``); what became of the unsynced operations."""
    crashes = CrashStates(io)
    states = list(crashes.states(point, exhaustive_up_to=0, samples=1, seed=rng.randrange(2**32)))
    state = rng.choice(states)
    crashes.materialize(state, scratch)
    shutil.rmtree(root)
    scratch.rename(root)
    shutil.rmtree(io.snapshot, ignore_errors=True)
    choices = state.choices
    return (
        f"{len(choices)} unsynced ops: {choices.count(0)} dropped, "
        f"{choices.count(1)} kept, {choices.count(2)} torn"
    )


SERVER_ADDRESS = "10.77.0.1"
SERVER_NAME = "server.sim"
SERVER_PORT = 7000
PRIMARY_DOMAIN = "primary.sim"
BLOCK = 4096
#: The share of seeds whose world is big: 2 to 12 primary hosts, up to 50 VMs in all
#: (issue 19's "10 to 50 primaries"); the other seeds keep 1 or 2 hosts of 1 or 2 VMs.
BIG_WORLDS = 0.015
MAX_BIG_HOSTS = 12
MAX_BIG_VMS = 50


#: The cluster (``frtesting/sim/cluster.py``): its nodes and its CAP.
MAX_NODES = 5
CAP_NAME = "cap.sim"
CAP_ADDRESS = "10.77.0.10"
CAP_PORT = 7100


def node_name(index: int) -> str:
    return f"n{index + 1}.sim"


def node_address(index: int) -> str:
    return f"10.77.0.{11 + index}"


def primary_address(index: int) -> str:
    return f"10.77.1.{index + 1}"


def primary_name(index: int) -> str:
    return f"p{index + 1}.{PRIMARY_DOMAIN}"


@functools.cache
def certificates(directory: Path) -> Path:
    """A CA and the host certificates of every simulated host, made once per process (the
    same files serve every run)."""
    if not (directory / "ca.pem").exists():
        create_ca(directory)
        issue_host_cert(directory, directory, SERVER_NAME, ip_addresses=[SERVER_ADDRESS])
        # The primaries' certificates are issued when a run first needs them
        # (``_client_context``): a big world has many.
        for i in range(MAX_NODES):
            issue_host_cert(
                directory,
                directory,
                node_name(i),
                extra_names=[CAP_NAME],
                ip_addresses=[node_address(i), CAP_ADDRESS],
            )
    return directory


@functools.cache
def _server_context(certs: Path) -> ssl.SSLContext:
    return server_context(
        certs / f"{SERVER_NAME}.pem", certs / f"{SERVER_NAME}-key.pem", certs / "ca.pem"
    )


@functools.cache
def _client_context(certs: Path, name: str, address: str | None = None) -> ssl.SSLContext:
    if not (certs / f"{name}.pem").exists():
        issue_host_cert(certs, certs, name, ip_addresses=[address] if address else [])
    return client_context(certs / f"{name}.pem", certs / f"{name}-key.pem", certs / "ca.pem")


def _letters(index: int) -> str:
    """``a``, ``b``, ... ``z``, ``ba``, ...: a VM's suffix on its host (``vm3a``)."""
    text = chr(ord("a") + index % 26)
    while index >= 26:
        index //= 26
        text = chr(ord("a") + index % 26) + text
    return text


@dataclass
class SimVM:
    """One VM of a primary: its disks (files the simulation writes to) and what the
    oracle keeps of them."""

    vmid: uuid.UUID
    name: str
    images: list[Path]
    rng: random.Random
    replicator: VMReplicator | None = None
    #: True while the primary captures (the disks must not change: the hooks' window).
    capturing: bool = False
    #: Disk contents at each captured sequence (and the IR's), for recovery points.
    contents: dict[int, list[bytes]] = field(default_factory=dict)
    _before: list[bytes] | None = None
    #: The highest sequence the primary was acknowledged (with the IR complete), as seen
    #: by the world before each fault; -1: no complete IR acknowledged yet.
    acked: int = -1

    def read_disks(self) -> list[bytes]:
        return [p.read_bytes() for p in self.images]

    def before_capture(self) -> None:
        self.capturing = True
        self._before = self.read_disks()

    def after_capture(self) -> None:
        self.capturing = False
        replicator = self.replicator
        if replicator is None or self._before is None:
            return
        cycles = [c.sequence for c in replicator.pending.cycles()]
        if cycles and cycles[-1] not in self.contents:
            self.contents[cycles[-1]] = self._before
        self._before = None

    @property
    def ir_complete(self) -> bool:
        r = self.replicator
        return r is not None and r.state.ir_state == IRStage.COMPLETE

    def observe(self) -> None:
        """Note the acknowledged sequence (called before every fault: no await between
        the acknowledgement and this read is lost, the replicator records it at once)."""
        r = self.replicator
        if r is not None and r.state.ir_state == IRStage.COMPLETE:
            self.acked = max(self.acked, r.state.sequence)


@dataclass
class SimPrimary:
    """A primary host: its VMs' replicators, started and killed together."""

    index: int
    state_dir: Path
    vms: list[SimVM]
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None
    io: HostFiles | None = None
    generation: int = 0

    @property
    def address(self) -> str:
        return primary_address(self.index)


class World:
    """The site of one run. ``rng`` draws the world's shape; the workload of each VM has
    its own generator (removing a fault from the schedule leaves the writes alone)."""

    def __init__(
        self,
        root: Path,
        certs: Path,
        seed: int,
        trace: Callable[[str], None],
        *,
        server_files: type[HostFiles] = HostFiles,
        target: tuple[str, int, str] = (SERVER_ADDRESS, SERVER_PORT, SERVER_NAME),
        hosts: dict[str, str] | None = None,
        primaries: int | None = None,
    ) -> None:
        self.root = root
        #: Where the primaries replicate to (address, port, TLS name), and their table of
        #: host names (the cluster's nodes).
        self.target, self.hosts = target, hosts or {}
        #: The server's file layer (a test gives one with a bug, to see a run fail).
        self.server_files = server_files
        self.certs = certs
        self.seed = seed
        self.trace = trace
        shape = random.Random(f"{seed}:shape")
        #: Every send on every link takes this long (a batch then spans simulated time,
        #: and a fault may fall in the middle of one).
        self.latency = shape.choice([0.0005, 0.002, 0.01])
        self.net = SimNetwork(self.latency)
        self.storage = root / "replicas"
        self.storage.mkdir(parents=True)
        self.server: RecoveryServer | None = None
        self.server_scope: trio.CancelScope | None = None
        self.server_io: HostFiles | None = None
        self.server_done = trio.Event()
        self.server_generation = 0
        self.recovery_points = shape.choice([2, 3, 4])
        self.frequency = shape.choice([10.0, 20.0, 30.0])
        self.primaries: list[SimPrimary] = []
        # The size is drawn apart from the shape: a small world is the same as before
        # big ones were drawn (seeds named in tests and reports keep their runs).
        size = random.Random(f"{seed}:size")
        big = primaries is not None or size.random() < BIG_WORLDS
        if primaries is not None:
            count, vm_budget = primaries, size.randint(primaries, 2 * primaries)
        elif big:
            count = size.randint(2, MAX_BIG_HOSTS)
            vm_budget = size.randint(count, MAX_BIG_VMS)
        else:
            count, vm_budget = shape.randint(1, 2), 4
        if big:
            # Many VMs at the longest cycle: a big run costs what a few small ones do.
            self.frequency = 30.0
        for p in range(count):
            state_dir = root / f"primary{p + 1}"
            vms = []
            if big:
                # Spread the budget over the hosts left (each gets at least one VM).
                share = vm_budget // (count - p)
                per_host = max(1, min(share + size.randint(0, 1), vm_budget - (count - p - 1)))
                vm_budget -= per_host
            else:
                per_host = shape.randint(1, 2)
            for v in range(per_host):
                name = f"vm{p + 1}{_letters(v)}"
                vmid = uuid.UUID(bytes=shape.randbytes(16), version=4)
                disks = []
                for d in range(1 if big else shape.choice([1, 1, 2])):
                    path = root / "disks" / f"{name}-{d}.img"
                    path.parent.mkdir(exist_ok=True)
                    # A big world's disks are small: its cost is in the number of VMs.
                    blocks = 16 if big else shape.choice([16, 32, 48])
                    size_bytes = blocks * BLOCK + shape.choice([0, 0, 512])
                    path.write_bytes(shape.randbytes(size_bytes))
                    disks.append(path)
                vms.append(SimVM(vmid, name, disks, random.Random(f"{seed}:disk:{name}")))
            self.primaries.append(SimPrimary(p, state_dir, vms))
        self.vms = [vm for p in self.primaries for vm in p.vms]
        for primary in self.primaries:
            store = PrimaryStateStore(primary.state_dir)
            for vm in primary.vms:
                store.save(
                    VMReplicationState(
                        vmid=str(vm.vmid),
                        name=vm.name,
                        disks=[
                            {"disk_id": f"disk{i}", "path": str(p), "size": p.stat().st_size}
                            for i, p in enumerate(vm.images)
                        ],
                        block_size=BLOCK,
                        recovery_host=self.target[0],
                        recovery_port=self.target[1],
                        server_name=self.target[2],
                        frequency_s=self.frequency,
                    )
                )

    # -- the recovery server ------------------------------------------------------------

    def _config(self) -> RecoveryServerConfig:
        certs = self.certs
        return RecoveryServerConfig(
            name=SERVER_NAME,
            listen=SERVER_ADDRESS,
            port=SERVER_PORT,
            tls=TLSFiles(
                certs / f"{SERVER_NAME}.pem", certs / f"{SERVER_NAME}-key.pem", certs / "ca.pem"
            ),
            authorization=Authorization(
                entries=(AuthorizationEntry(f"*.{PRIMARY_DOMAIN}", self.storage, "site-a"),)
            ),
            recovery_points=self.recovery_points,
        )

    def _file_io(self, storage: Path) -> HostFiles:
        if self.server_io is not None:
            return self.server_io  # one location: one layer per life of the server
        self.server_generation += 1
        io = self.server_files(storage, self.root / f"snapshot-{self.server_generation}")
        self.server_io = io
        return io

    async def start_server(self, nursery: trio.Nursery) -> RecoveryServer:
        server = RecoveryServer(
            self._config(), ssl_context=_server_context(self.certs), file_io=self._file_io
        )
        # Handing freed memory back to the system (gc.collect, malloc_trim) after closes
        # changes nothing the simulation looks at, and costs most of its time.
        server.gate.trim = lambda **_: None
        scope = trio.CancelScope()
        done = self.server_done = trio.Event()
        # The layer is made before the server opens its storage, so that a death armed
        # at once finds it.
        io = self._file_io(self.storage)

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope, network.using(self.net.host(SERVER_ADDRESS)):
                    await server.serve(task_status=task_status)
            except BaseException:
                if not io.dead:
                    raise
            finally:
                done.set()

        self.server, self.server_scope = server, scope
        await nursery.start(run)
        return server

    async def kill_server(self, *, power_loss: bool, rng: random.Random) -> str:
        """Kill the server: its connections break, its files change no more. With
        ``power_loss``, what its storage engine wrote since the last sync may be dropped
        or torn (one state a power cut may leave, drawn by ``rng``). What became of the
        unsynced writes."""
        assert self.server is not None
        assert self.server_scope is not None
        io = self.server_io
        assert io is not None
        point = min(len(io.ops), io.trip_at) if io.trip_at >= 0 else len(io.ops)
        io.dead = True
        self.net.isolate(SERVER_ADDRESS)
        self.server_scope.cancel()
        await self.server_done.wait()
        self.server.close()
        self.server = None
        self.server_io = None
        if not power_loss:
            return "page cache kept"
        scratch = self.root / f"crashed-{self.server_generation}"
        return power_cut(io, point, rng, self.storage, scratch)

    # -- the primaries --------------------------------------------------------------------

    def _replicator(self, primary: SimPrimary, vm: SimVM) -> VMReplicator:
        store = PrimaryStateStore(primary.state_dir)
        name = primary_name(primary.index)
        replicator = VMReplicator(
            store.load(str(vm.vmid)),
            store,
            _client_context(self.certs, name, primary.address),
            local_address=primary.address,
            before_capture=vm.before_capture,
            after_capture=vm.after_capture,
            hosts=self.hosts,
        )
        vm.replicator = replicator
        return replicator

    async def start_primary(self, nursery: trio.Nursery, primary: SimPrimary) -> None:
        scope = trio.CancelScope()
        done = trio.Event()
        primary.scope, primary.done = scope, done
        primary.generation += 1
        snapshot = self.root / f"psnapshot-{primary.index}-{primary.generation}"
        io = primary.io = HostFiles(primary.state_dir, snapshot)
        with durable.using(io):
            replicators = [self._replicator(primary, vm) for vm in primary.vms]

        async def run() -> None:
            try:
                with scope, network.using(self.net.host(primary.address)), durable.using(io):
                    async with trio.open_nursery() as inner:
                        for replicator in replicators:
                            inner.start_soon(replicator.run)
            except BaseException:
                if not io.dead:
                    raise
                # What it raised once dead (HostDied, a refused write) died with it.
            finally:
                done.set()

        nursery.start_soon(run)
        await trio.lowlevel.checkpoint()

    async def kill_primary(
        self, primary: SimPrimary, *, power_loss: bool, rng: random.Random
    ) -> str:
        """Kill a primary host, like :meth:`kill_server` (its VMs' disks are not part of
        the power cut: the hypervisor's storage is not the primary's state)."""
        assert primary.scope is not None
        assert primary.done is not None
        assert primary.io is not None
        io = primary.io
        point = min(len(io.ops), io.trip_at) if io.trip_at >= 0 else len(io.ops)
        io.dead = True
        self.net.isolate(primary.address)
        primary.scope.cancel()
        await primary.done.wait()
        for vm in primary.vms:
            vm.capturing = False
            vm.replicator = None
        primary.io = None
        if not power_loss:
            return "page cache kept"
        scratch = self.root / f"pcrashed-{primary.index}-{primary.generation}"
        return power_cut(io, point, rng, primary.state_dir, scratch)

    def observe(self) -> None:
        for vm in self.vms:
            vm.observe()

    # -- the workload ---------------------------------------------------------------------

    async def write_disks(self, vm: SimVM, until: float) -> None:
        """Write to the VM's disks now and then, as a running VM would, until ``until``:
        never during a capture (the hooks' window) nor before the IR is complete (the IR
        reads the disks as they are)."""
        while trio.current_time() < until:
            await trio.sleep(vm.rng.expovariate(1 / 8.0))
            if vm.capturing or not vm.ir_complete:
                continue
            assert vm.replicator is not None
            if vm.replicator.state.sequence not in vm.contents and not vm.contents:
                # The IR's point: the disks did not change since it began.
                vm.contents[vm.replicator.state.sequence] = vm.read_disks()
            for _ in range(vm.rng.randint(1, 4)):
                path = vm.rng.choice(vm.images)
                size = path.stat().st_size
                length = vm.rng.choice([512, BLOCK, 3 * BLOCK, 700])
                offset = vm.rng.randrange(0, size - length)
                with path.open("r+b") as image:
                    image.seek(offset)
                    image.write(vm.rng.randbytes(length))

"""Running one simulated site from a seed, deterministically, and shrinking a failure.

:func:`run_seed` runs the world of ``frtesting/sim/world.py`` under Trio's ``MockClock``
(autojump: simulated time jumps to the next deadline whenever every task waits), with the
faults of :func:`~frtesting.sim.faults.draw_schedule` (or a subset of them), and returns
the event trace, the faults applied and the invariant violations. What would make two
runs of one seed differ is pinned for the run's duration (:func:`_deterministic`):

* Trio's scheduler orders each batch of runnable tasks by creation, then shuffles it with
  its own generator, seeded from the run's seed (Trio's Hypothesis mode);
* ``trio.to_thread.run_sync`` runs the function inline, after a simulated wait drawn from
  the seed: a worker thread would let the clock jump while it works, at a moment that
  depends on the machine;
* ``uuid.uuid4`` draws from a generator seeded from the run's seed (names of staging
  directories and writers' tokens end up in logs).

The trace holds the world's events and the production code's own log lines (paths
relative to the run's directory), each with its simulated time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import tempfile
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from . import invariants
from .faults import ARMED_SECONDS, PRIMARY_KINDS, Fault, draw_schedule
from .world import SERVER_ADDRESS, HostFiles, World, certificates

#: Faults happen in the first FAULT_WINDOW simulated seconds; then the links heal, every
#: host runs, the disks stop changing, and after QUIET more seconds the run is checked.
FAULT_WINDOW = 150.0
QUIET = 150.0
#: How long a call given to a worker thread takes, in simulated seconds (drawn per call).
THREAD_SECONDS = (0.0, 0.0, 0.001, 0.01, 0.05, 0.2)
#: The delay of every send on a slowed link.
SLOW_SECONDS = 0.05
#: The world's state is traced every so many simulated seconds.
TICK = 10.0


@dataclass
class RunResult:
    """What one run did."""

    seed: int
    schedule: list[Fault]
    applied: list[int]  #: indices (in ``schedule``) of the faults replayed
    trace: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    simulated_seconds: float = 0.0
    cluster: bool = False  #: a cluster run (``run_cluster_seed``)
    primaries: int | None = None  #: the primary hosts asked for (``--primaries``)

    @property
    def ok(self) -> bool:
        return not self.failures

    def replay_command(self) -> str:
        """The command that replays this run."""
        command = f"scripts/simulate {'--cluster ' if self.cluster else ''}--seed {self.seed}"
        if len(self.applied) != len(self.schedule):
            command += " --faults " + (",".join(map(str, self.applied)) or "none")
        if self.primaries is not None:
            command += f" --primaries {self.primaries}"
        return command


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    run_module: Any = trio._core._run  # the scheduler's own generator
    saved = (run_module._ALLOW_DETERMINISTIC_SCHEDULING, run_module._r.getstate())
    saved_uuid4, saved_to_thread = uuid.uuid4, trio.to_thread.run_sync
    ids = random.Random(f"{seed}:uuid")

    def uuid4() -> uuid.UUID:
        return uuid.UUID(int=ids.getrandbits(128), version=4)

    waits = random.Random(f"{seed}:threads")

    async def inline(fn: Any, *args: Any, **_options: Any) -> Any:
        # A worker thread's call takes simulated time (a disk's), during which other
        # tasks run and a fault may strike; like a thread, it is not cancelled meanwhile.
        with trio.CancelScope(shield=True):
            await trio.sleep(waits.choice(THREAD_SECONDS))
        result = fn(*args)
        await trio.lowlevel.checkpoint()
        return result

    run_module._ALLOW_DETERMINISTIC_SCHEDULING = True
    run_module._r.seed(seed)
    threads: Any = trio.to_thread
    uuid.uuid4 = uuid4
    threads.run_sync = inline
    try:
        yield
    finally:
        run_module._ALLOW_DETERMINISTIC_SCHEDULING, state = saved
        run_module._r.setstate(state)
        uuid.uuid4 = saved_uuid4
        threads.run_sync = saved_to_thread


_WALL_TIME = re.compile(r"\b1[0-9]{9}\.[0-9]+")
#: CPU seconds a thread ran (``<name>_cpu=``, a batch's ``receive_cpu``): the machine's too.
_CPU_TIME = re.compile(r"\b(\w+_cpu)=[0-9.]+")


class _TraceLogs(logging.Handler):
    """Production log lines into the trace (INFO and above), paths made relative."""

    def __init__(self, trace: list[str], root: Path) -> None:
        super().__init__(logging.INFO)
        self._trace, self._root = trace, str(root)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:
            return
        # Wall-clock times (a batch's timings) are the machine's, not the simulation's.
        text = _WALL_TIME.sub("T", record.getMessage().replace(self._root, "~"))
        text = _CPU_TIME.sub(r"\1=C", text)
        self._trace.append(f"{now:10.3f} log {record.name}: {text}")


def _certs_dir() -> Path:
    return certificates(Path(tempfile.mkdtemp(prefix="frrep-sim-certs-")))


_CERTS: list[Path] = []


def _default_base() -> Path | None:
    """Memory-backed storage when the machine has it: the engine's syncs are real system
    calls, and on a disk they would cost most of a run's time (power loss is modelled
    by the recording layer, not by the disk)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _crash_is_a_failure(result: RunResult, run: Any, *args: Any, **kwargs: Any) -> None:
    """Run the world; an exception out of it (the production code or the world crashed)
    is a failure of the run, with its seed and replay command like any other."""
    try:
        run(*args, **kwargs)
    except Exception as exc:
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        line = f"#crash {type(leaf).__name__}: {leaf}"
        result.trace.append(f"{'':>10} {line}")
        result.trace += traceback.format_exception(exc)
        result.failures.append(line)


@contextlib.contextmanager
def _a_run(seed: int, prefix: str, base: Path | None) -> Iterator[tuple[Path, list[str]]]:
    """The run's directory and trace, with the production log lines going to the trace and
    everything that would differ between two runs of the seed pinned; cleaned up after."""
    if not _CERTS:
        _CERTS.append(_certs_dir())
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-{seed}-", dir=base or _default_base()))
    trace: list[str] = []
    handler = _TraceLogs(trace, root)
    logger = logging.getLogger("frrep")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the trace has them; a test's log capture need not
    try:
        with _deterministic(seed):
            yield root, trace
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        shutil.rmtree(root, ignore_errors=True)


def _tracer(trace: list[str]) -> Callable[[str], None]:
    def event(text: str) -> None:
        trace.append(f"{trio.current_time():10.3f} {text}")

    return event


def _applied(schedule: list[Fault], keep: Sequence[int] | None) -> list[int]:
    return list(range(len(schedule))) if keep is None else sorted(set(keep))


def run_seed(
    seed: int,
    *,
    keep: Sequence[int] | None = None,
    base: Path | None = None,
    server_files: type[HostFiles] = HostFiles,
    primaries: int | None = None,
) -> RunResult:
    """Run seed ``seed`` with every fault of its schedule, or only those at the indices
    ``keep``; ``base``: where the run's directory is made (a temporary one by default);
    ``server_files``: the recovery server's file layer (tests give one with a bug);
    ``primaries``: this many primary hosts (a big world) instead of the seed's draw."""
    with _a_run(seed, "frrep-sim", base) as (root, trace):
        world = World(
            root / "site",
            _CERTS[0],
            seed,
            _tracer(trace),
            server_files=server_files,
            primaries=primaries,
        )
        schedule = draw_schedule(seed, len(world.primaries), FAULT_WINDOW, world.frequency)
        applied = _applied(schedule, keep)
        result = RunResult(seed, schedule, applied, trace, primaries=primaries)
        faults = [schedule[i] for i in applied]
        clock = trio.testing.MockClock(autojump_threshold=0)
        _crash_is_a_failure(result, trio.run, _main, world, faults, result, clock=clock)
    return result


async def _main(world: World, faults: list[Fault], result: RunResult) -> None:
    event = world.trace
    digests: dict[tuple[str, int], str] = {}
    rng = random.Random(f"{world.seed}:powerloss")
    event(
        f"world seed={world.seed} primaries={len(world.primaries)} vms={len(world.vms)} "
        f"frequency={world.frequency:g}s recovery_points={world.recovery_points} "
        f"latency={world.latency * 1000:g}ms"
    )
    for vm in world.vms:
        event(f"vm {vm.name} {vm.vmid} disks={[p.stat().st_size for p in vm.images]}")

    def fail(found: list[str]) -> None:
        for line in found:
            event(f"INVARIANT {line}")
        result.failures += found

    async with trio.open_nursery() as nursery:
        await world.start_server(nursery)
        for primary in world.primaries:
            await world.start_primary(nursery, primary)
        for vm in world.vms:
            nursery.start_soon(world.write_disks, vm, FAULT_WINDOW)

        async def ticks() -> None:
            while True:
                await trio.sleep(TICK)
                world.observe()
                states = " ".join(
                    f"{vm.name}={'-' if vm.replicator is None else vm.replicator.state.sequence}"
                    f"/{vm.acked}"
                    for vm in world.vms
                )
                event(f"tick {states}")

        nursery.start_soon(ticks)
        busy: set[str] = set()

        async def kill(fault: Fault, io: HostFiles | None) -> None:
            """Wait for an armed kill's file change (or its time), then note the acks."""
            if fault.ops and io is not None:
                tripped = trio.Event()

                def strike() -> None:
                    world.observe()
                    tripped.set()

                io.trip(fault.ops, strike)
                with trio.move_on_after(ARMED_SECONDS):
                    await tripped.wait()
                if not tripped.is_set():
                    io.disarm()
                    event(f"armed kill struck by time: {fault.describe()}")
            world.observe()

        async def server_fault(fault: Fault) -> None:
            await kill(fault, world.server_io)
            what = await world.kill_server(power_loss=fault.kind == "server_power_loss", rng=rng)
            event(f"server killed ({what})")
            await trio.sleep(fault.length)
            await world.start_server(nursery)
            event("server started")
            fail(await invariants.check_durable(world, digests))

        async def primary_fault(fault: Fault) -> None:
            primary = world.primaries[fault.target]
            await kill(fault, primary.io)
            what = await world.kill_primary(
                primary, power_loss=fault.kind == "primary_power_loss", rng=rng
            )
            event(f"primary p{fault.target + 1} killed ({what})")
            await trio.sleep(fault.length)
            await world.start_primary(nursery, primary)
            event(f"primary p{fault.target + 1} started")

        async def link_fault(fault: Fault) -> None:
            address = world.primaries[fault.target].address
            if fault.kind == "link_cut":
                broken = world.net.cut(address, SERVER_ADDRESS)
                event(f"link p{fault.target + 1} cut ({broken} stream ends broken)")
            else:
                world.net.slow(address, SERVER_ADDRESS, SLOW_SECONDS)
            await trio.sleep(fault.length)
            world.net.heal(address, SERVER_ADDRESS)
            event(f"link p{fault.target + 1} healed")

        async def disk_full(fault: Fault) -> None:
            io = world.server_io
            if io is None:
                event("disk full skipped: the server is down")
                return
            io.full = True
            await trio.sleep(fault.length)
            io.full = False  # a restart meanwhile made another layer, with room
            event("server disk has room again")

        async def run_fault(fault: Fault, key: str) -> None:
            try:
                if fault.kind == "server_disk_full":
                    await disk_full(fault)
                elif fault.kind in ("server_kill", "server_power_loss"):
                    await server_fault(fault)
                elif fault.kind in ("link_cut", "link_slow"):
                    await link_fault(fault)
                else:
                    await primary_fault(fault)
            finally:
                busy.discard(key)

        async with trio.open_nursery() as faulting:
            for fault in faults:
                await trio.sleep_until(fault.at)
                key = "disk" if fault.kind == "server_disk_full" else "server"
                if fault.kind in PRIMARY_KINDS:
                    key = f"{'link' if fault.kind.startswith('link') else 'primary'}{fault.target}"
                if key in busy:
                    event(f"fault skipped (already under a fault): {fault.describe()}")
                    continue
                busy.add(key)
                result.faults[fault.kind] += 1
                event(f"fault {fault.describe()}")
                faulting.start_soon(run_fault, fault, key)
            await trio.sleep_until(FAULT_WINDOW)
            world.net.heal_all()
        event("faults over: quiet from now on")
        await trio.sleep(QUIET)
        world.observe()
        # Stop the primaries first: the check reads the replicas as they are.
        for primary in world.primaries:
            if primary.scope is not None:
                primary.scope.cancel()
        await trio.lowlevel.checkpoint()
        fail(await invariants.check_durable(world, digests))
        fail(await invariants.check_quiet(world))
        result.simulated_seconds = trio.current_time()
        event(f"end: {len(result.failures)} invariant failures")
        nursery.cancel_scope.cancel()


def run_cluster_seed(seed: int, *, keep: Sequence[int] | None = None) -> RunResult:
    """Run the cluster simulation (``frtesting/sim/cluster.py``) of seed ``seed``."""
    from .cluster import ClusterWorld, draw_cluster_schedule, run_cluster

    with _a_run(seed, "frrep-simc", None) as (root, trace):
        world = ClusterWorld(root / "site", _CERTS[0], seed)
        world.trace = _tracer(trace)
        schedule = draw_cluster_schedule(seed, len(world.nodes), len(world.primaries))
        applied = _applied(schedule, keep)
        result = RunResult(seed, schedule, applied, trace, cluster=True)
        faults = [schedule[i] for i in applied]
        rng = random.Random(f"{seed}:powerloss")
        clock = trio.testing.MockClock(autojump_threshold=0)
        _crash_is_a_failure(result, trio.run, run_cluster, world, result, faults, rng, clock=clock)
    return result


def shrink(result: RunResult, *, server_files: type[HostFiles] = HostFiles) -> RunResult:
    """A shorter schedule with the same failure (the first invariant's number): drop one
    fault at a time and keep each drop that still fails (``server_files``: as the run's)."""
    assert result.failures
    want = result.failures[0].split()[0]
    best = result
    for index in list(result.applied):
        keep = [i for i in best.applied if i != index]
        if result.cluster:
            trial = run_cluster_seed(result.seed, keep=keep)
        else:
            trial = run_seed(
                result.seed, keep=keep, server_files=server_files, primaries=result.primaries
            )
        if any(f.split()[0] == want for f in trial.failures):
            best = trial
    return best

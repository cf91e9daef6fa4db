"""Many VMs on one site: lag, CPU, memory and descriptors of a 3-node cluster under load.

Run as ``.venv/bin/python bench/scale.py`` (500 VMs for 10 minutes: about 15 minutes in
all). On loopback:

* **the recovery cluster**: 3 real ``frctl node run`` processes (127.0.0.11-13, SQLite
  store), the CAP at 127.0.0.10 served by whichever holds the election
  (``frtesting.cluster.ClusterSite``); each replica keeps ``--points`` recovery points.
* **the primaries**: ``--primaries`` real ``frctl primary run`` processes, each with a
  certificate and a source address of its own (``sK.primary.example.com`` at
  127.0.0.(30+K)), the VMs dealt round-robin among them. Every VM is enabled as
  ``frctl replication enable`` does it (``node.primary.operations.enable``, called in this
  process: 500 CLI start-ups would take minutes) with the CAP as its target and
  ``--interval`` as its frequency. The services find the changes by digest scan (no
  change tracker: what ``frctl primary run`` does).
* **the VMs**: ``--vms`` sparse images of ``--size-mib`` MiB, ``--seed-mib`` of random data
  at random 64 KiB blocks; after each acknowledged batch of a VM (seen here within
  ``--sample`` seconds), ``--write-blocks`` random blocks of its image are rewritten, so
  every cycle has changes to send.

The run: the initial replications (not measured), then ``--minutes`` of steady state,
measured, then writes stop, every VM's next cycle is awaited, the primaries are stopped
and every replica is compared byte for byte with its image (``mismatched_replicas``;
nothing lost means 0).

Figures (from the primaries' state files, the same that ``frctl replication status
--json`` reads, and ``/proc``):

* **lag** of a VM at time t: t minus the capture time of its last acknowledged batch
  (``last_captured_at``), sampled every ``--sample`` seconds; each VM's worst lag is exact
  (just before an acknowledgement, the ack time minus the previous batch's capture).
  ``lag_p50_s`` / ``lag_p99_s`` are over all samples of all VMs, ``lag_max_s`` the worst
  of any VM; ``over_2x_interval``: VMs whose worst lag passed twice the interval
  (``frctl replication status`` calls such a VM late). Goal: 0.
* **CPU** (percent of one core over the steady window), **RSS** and **open file
  descriptors** (the largest sampled) of each node, the CAP's node marked, and of each
  primary; **payload**: batch bytes acknowledged per second, all VMs together.
* **rss_per_vm_mib**: for each node, (RSS at the end - RSS before any VM was enabled) /
  the VMs it holds; the largest. Goal <= 1 MiB.

The baseline (the README's convention) is the interval: ``value`` is the worst lag,
``ratio`` = value / interval (goal <= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frlink.certs import issue_host_cert
from frtesting.cluster import (
    CAP_ADDRESS,
    CAP_NAME,
    ClusterSite,
    NodeProcess,
    node_address,
    node_name,
    replica_path,
)
from frtesting.server import child_env
from node.primary.config import DEFAULT_MAX_SESSIONS
from node.primary.operations import EnableRequest, enable
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState

NODES = 3
BLOCK = 64 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- processes: CPU, RSS, descriptors --------------------------------------------------


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of process ``pid`` (every thread), from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def proc_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """What ``pid``'s descriptors are: sockets, images, journals, the store, locks..."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:", "anon_inode:")):
            kind = target.split(":")[0]
        elif ".db" in target:
            kind = "store"
        elif "/.locks/" in target:
            kind = "lock"  # the primary's service and cycle locks (pending logs: "cycle")
        else:
            suffix = Path(target.split(" ")[0]).suffix.lstrip(".")
            kind = suffix or "other"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


@dataclass
class Watched:
    """One process whose CPU, RSS and descriptors are followed."""

    label: str
    pid: int
    cpu0: float = 0.0
    cpu1: float = 0.0
    rss_idle: int = 0
    rss_max: int = 0
    rss_end: int = 0
    fds_max: int = 0
    fds_end: dict[str, int] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            rss = proc_rss(self.pid)
            self.rss_max = max(self.rss_max, rss)
            self.fds_max = max(self.fds_max, proc_fds(self.pid))
        except OSError:
            pass  # it exited; the run reports what it saw


# -- the primaries -----------------------------------------------------------------------


def primary_name(k: int) -> str:
    return f"s{k}.primary.example.com"


def primary_address(k: int) -> str:
    return f"127.0.0.{30 + k}"


@dataclass
class Primary:
    """One ``frctl primary run`` process and its state directory."""

    index: int
    config: Path
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def store(self) -> PrimaryStateStore:
        return PrimaryStateStore(self.state_dir)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "frctl",
                    "primary",
                    "run",
                    "--config",
                    str(self.config),
                    "--log-level",
                    "warning",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )

    def stop(self) -> None:
        """SIGTERM (the service ends its cycle's writes cleanly), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def make_primary(site: ClusterSite, k: int, max_sessions: int) -> Primary:
    name = primary_name(k)
    issue_host_cert(site.certs, site.certs, name, ip_addresses=[primary_address(k)])
    hosts = "\n".join(f'"{node_name(i)}" = "{node_address(i)}"' for i in range(1, NODES + 1))
    config = site.root / f"primary{k}.toml"
    config.write_text(
        f"""
[primary]
name = "{name}"
state_dir = "primary{k}-state"
local_address = "{primary_address(k)}"
max_sessions = {max_sessions}

[tls]
cert = "certs/{name}.pem"
key = "certs/{name}-key.pem"
ca = "certs/ca.pem"

[hosts]
"{CAP_NAME}" = "{CAP_ADDRESS}"
{hosts}
"""
    )
    return Primary(k, config, site.root / f"primary{k}-state", site.root / f"primary{k}.log")


# -- the VMs -----------------------------------------------------------------------------


@dataclass
class VM:
    """One VM: its image, the primary replicating it, and what was seen of it."""

    vmid: uuid.UUID
    image: Path
    primary: Primary
    blocks: int
    #: The capture time of the last acknowledged batch seen (None: none yet).
    captured: float | None = None
    sequence: int = -1
    #: When this process last wrote to the image.
    last_write: float = 0.0
    worst_lag: float = 0.0
    state: VMReplicationState | None = None
    batch_bytes0: int = 0
    cycles_failed0: int = 0


def make_image(path: Path, size: int, seed_blocks: int, rng: random.Random) -> None:
    """A sparse image of ``size`` bytes with ``seed_blocks`` random blocks of data."""
    blocks = size // BLOCK
    with path.open("wb") as f:
        f.truncate(size)
        for b in rng.sample(range(blocks), min(seed_blocks, blocks)):
            f.seek(b * BLOCK)
            f.write(rng.randbytes(BLOCK))


def write_blocks(vm: VM, count: int, rng: random.Random) -> None:
    """Rewrite ``count`` random blocks of the VM's image (a guest writing)."""
    fd = os.open(vm.image, os.O_WRONLY)
    try:
        for b in rng.sample(range(vm.blocks), min(count, vm.blocks)):
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
    finally:
        os.close(fd)
    vm.last_write = time.time()


# -- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    """The site, its processes and VMs, and what the sampler saw."""

    site: ClusterSite
    primaries: list[Primary]
    vms: list[VM]
    args: argparse.Namespace
    rng: random.Random
    watched: list[Watched] = field(default_factory=list)
    lag_samples: list[float] = field(default_factory=list)
    #: Per acknowledged batch in the window: capture to acknowledgement, and the time
    #: since the VM's previous capture (the interval as kept); their sum is the lag peak.
    capture_to_ack: list[float] = field(default_factory=list)
    capture_spacing: list[float] = field(default_factory=list)
    measuring: bool = False
    writing: bool = True

    def read_states(self) -> None:
        by_vmid = {str(vm.vmid): vm for vm in self.vms}
        for primary in self.primaries:
            for state in primary.store.all():
                vm = by_vmid.get(state.vmid)
                if vm is not None:
                    vm.state = state

    def sample(self) -> None:
        """One look at every VM's state: record its lag, and write to the images of VMs
        that had a batch acknowledged (or finished their IR) since the last look."""
        self.read_states()
        now = time.time()
        for vm in self.vms:
            s = vm.state
            if s is None or s.ir_state != IRStage.COMPLETE:
                continue
            if s.last_captured_at is not None and s.last_captured_at != vm.captured:
                if self.measuring and vm.captured is not None and s.last_replicated_at:
                    # The lag peaked just before this acknowledgement.
                    vm.worst_lag = max(vm.worst_lag, s.last_replicated_at - vm.captured)
                    self.capture_to_ack.append(s.last_replicated_at - s.last_captured_at)
                    self.capture_spacing.append(s.last_captured_at - vm.captured)
                vm.captured = s.last_captured_at
            if self.measuring and vm.captured is not None:
                lag = now - vm.captured
                self.lag_samples.append(lag)
                vm.worst_lag = max(vm.worst_lag, lag)
            if s.sequence != vm.sequence:
                vm.sequence = s.sequence
                if self.writing:
                    write_blocks(vm, self.args.write_blocks, self.rng)
        for w in self.watched:
            w.sample()

    def sample_for(self, seconds: float, until: Any = None) -> bool:
        """Sample every ``--sample`` seconds for ``seconds`` or until ``until()``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            self.sample()
            if until is not None and until():
                return True
            for primary in self.primaries:
                if primary.proc is not None and primary.proc.poll() is not None:
                    raise RuntimeError(
                        f"primary {primary.index} exited: {primary.log.read_text()[-3000:]}"
                    )
            time.sleep(max(0.0, self.args.sample - (time.monotonic() - started)))
        return until is None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def same_file(a: Path, b: Path) -> bool:
    """Byte-for-byte equal (sizes included)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x = fa.read(4 << 20)
            if x != fb.read(4 << 20):
                return False
            if not x:
                return True


def node_of(site: ClusterSite, vm: VM) -> int | None:
    if vm.state is None:
        return None
    for i in range(1, NODES + 1):
        if node_name(i) == vm.state.node_name.lower():
            return i
    return None


def start_site(args: argparse.Namespace, site: ClusterSite, primaries: list[Primary]) -> Run:
    """Start the nodes, make the images, enable the VMs, start the primaries (each
    appended to ``primaries`` as it is made, so that the caller stops what started)."""
    root = site.root
    site.start_all()
    site.broker_node(timeout=60)
    site.authorize_primary(recovery_points=args.points)
    primaries.extend(make_primary(site, k, args.max_sessions) for k in range(1, args.primaries + 1))
    rng = random.Random(args.seed)
    images = root / "images"
    images.mkdir()
    size = args.size_mib << 20
    vms = []
    for n in range(args.vms):
        vmid = uuid.UUID(int=rng.getrandbits(128), version=4)
        image = images / f"vm{n}.img"
        make_image(image, size, (args.seed_mib << 20) // BLOCK, rng)
        vms.append(VM(vmid, image, primaries[n % len(primaries)], size // BLOCK))
    run = Run(site, primaries, vms, args, rng)
    run.watched = [Watched(f"node n{i}", site.running[i].proc.pid) for i in site.running]
    for w in run.watched:
        w.rss_idle = proc_rss(w.pid)
        w.sample()
    for n, vm in enumerate(vms):
        enable(
            vm.primary.store,
            EnableRequest(
                vmid=str(vm.vmid),
                name=f"vm{n}",
                disk_specs=[f"disk0={vm.image}"],
                server=f"{CAP_ADDRESS}:{site.cap_port}",
                server_name=CAP_NAME,
                frequency_s=args.interval,
            ),
        )
    for primary in primaries:
        primary.start()
        assert primary.proc is not None
        run.watched.append(Watched(f"primary p{primary.index}", primary.proc.pid))
    return run


def log_lines(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the JSON line."""
    parser = argparse.ArgumentParser(description="many VMs on one 3-node site")
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=10.0, help="steady state measured")
    parser.add_argument("--interval", type=float, default=30.0, help="each VM's frequency (s)")
    parser.add_argument("--size-mib", type=int, default=64, help="each VM's disk")
    parser.add_argument("--seed-mib", type=int, default=4, help="data in each image at start")
    parser.add_argument("--write-blocks", type=int, default=8, help="64 KiB blocks per cycle")
    parser.add_argument("--primaries", type=int, default=4, help="frctl primary run processes")
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=DEFAULT_MAX_SESSIONS,
        help="[primary] max_sessions of each primary",
    )
    parser.add_argument("--points", type=int, default=4, help="recovery points per replica")
    parser.add_argument("--lease-ttl", type=float, default=5.0, help="the election's lease")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between looks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory parent")
    args = parser.parse_args(argv)
    args.primaries = max(1, min(args.primaries, args.vms))
    root = Path(tempfile.mkdtemp(prefix="frrep-bench-scale-", dir=args.tmp))
    print(
        f"scale: {args.vms} VMs of {args.size_mib} MiB ({args.seed_mib} MiB of data each), "
        f"every {args.interval:g} s, {args.write_blocks} blocks of 64 KiB written between "
        f"cycles; {NODES} node processes, {args.primaries} primary processes "
        f"(max_sessions {args.max_sessions} each); "
        f"{args.minutes:g} min measured",
        flush=True,
    )
    primaries: list[Primary] = []
    try:
        site = ClusterSite(root, nodes=NODES, lease_ttl=args.lease_ttl)
        try:
            result = measure(start_site(args, site, primaries))
        finally:
            for primary in primaries:
                primary.stop()
            site.stop_all()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    return 0


def measure(run: Run) -> dict[str, Any]:
    args, site, vms = run.args, run.site, run.vms
    started = time.monotonic()
    ir_timeout = 300 + 2.0 * len(vms) + 4 * args.interval

    def all_replicating() -> bool:
        return all(vm.captured is not None for vm in vms)

    if not run.sample_for(ir_timeout, all_replicating):
        behind = [vm for vm in vms if vm.captured is None]
        raise RuntimeError(f"{len(behind)} VMs had no batch acknowledged after {ir_timeout} s")
    ir_seconds = time.monotonic() - started
    print(
        f"initial replications and a first batch of every VM: {ir_seconds:.0f} s; measuring "
        f"{args.minutes:g} min",
        flush=True,
    )
    for vm in vms:
        assert vm.state is not None
        vm.batch_bytes0, vm.cycles_failed0 = vm.state.batch_bytes_sent, vm.state.cycles_failed
    for w in run.watched:
        w.cpu0 = proc_cpu(w.pid)
    run.measuring = True
    window_start = time.monotonic()
    run.sample_for(args.minutes * 60)
    window = time.monotonic() - window_start
    now = time.time()
    for vm in vms:
        if vm.captured is not None:
            vm.worst_lag = max(vm.worst_lag, now - vm.captured)
    for w in run.watched:
        w.cpu1 = proc_cpu(w.pid)
        w.rss_end = proc_rss(w.pid)
        w.fds_end = fd_kinds(w.pid)
    run.measuring = False
    payload = sum((vm.state.batch_bytes_sent if vm.state else 0) - vm.batch_bytes0 for vm in vms)
    failed = sum((vm.state.cycles_failed if vm.state else 0) - vm.cycles_failed0 for vm in vms)
    holders = dict.fromkeys(range(1, NODES + 1), 0)
    for vm in vms:
        i = node_of(site, vm)
        if i is not None:
            holders[i] += 1
    cap = site.broker_node(timeout=30)

    # Writes stop; every VM's next cycle captures its last write; then compare.
    run.writing = False
    last_write = {vm.vmid: vm.last_write for vm in vms}

    def all_caught_up() -> bool:
        return all(vm.captured is not None and vm.captured > last_write[vm.vmid] for vm in vms)

    caught_up = run.sample_for(3 * args.interval + 60, all_caught_up)
    for primary in run.primaries:
        primary.stop()
    mismatched = []
    for vm in vms:
        i = node_of(site, vm)
        replica = None if i is None else replica_path(site, i, vm.vmid)
        if replica is None or not replica.exists() or not same_file(vm.image, replica):
            mismatched.append(vm)
    refused = sum(log_lines(n.log, "refused:") for n in site.running.values())
    return report(run, window, payload, failed, holders, cap, mismatched, caught_up, refused)


def report(
    run: Run,
    window: float,
    payload: int,
    failed: int,
    holders: dict[int, int],
    cap: NodeProcess,
    mismatched: list[VM],
    caught_up: bool,
    refused: int,
) -> dict[str, Any]:
    args, vms = run.args, run.vms
    worst = [vm.worst_lag for vm in vms]
    samples = run.lag_samples
    over = [vm for vm in vms if vm.worst_lag > 2 * args.interval]
    print(
        f"lag over {len(samples)} samples of {len(vms)} VMs (interval {args.interval:g} s): "
        f"p50 {percentile(samples, 0.5):.1f} s, p99 {percentile(samples, 0.99):.1f} s, "
        f"max {max(worst, default=0):.1f} s; worst lag per VM: median "
        f"{statistics.median(worst) if worst else 0:.1f} s; VMs over 2x the interval: "
        f"{len(over)} (goal 0)"
    )
    to_ack, spacing = run.capture_to_ack, run.capture_spacing
    print(
        f"where the lag peak comes from, over {len(to_ack)} batches: capture to ack p50 "
        f"{percentile(to_ack, 0.5):.1f} s, p99 {percentile(to_ack, 0.99):.1f} s, max "
        f"{max(to_ack, default=0):.1f} s; time since the VM's previous capture p50 "
        f"{percentile(spacing, 0.5):.1f} s, p99 {percentile(spacing, 0.99):.1f} s, max "
        f"{max(spacing, default=0):.1f} s"
    )
    print(
        f"payload acknowledged: {payload / window / 1e6:.2f} MB/s ({payload / 1e9:.2f} GB in "
        f"{window:.0f} s); failed cycles in the window: {failed}; connections refused by "
        f"the nodes' bounds (whole run, the initial replications included): {refused}"
    )
    per_vm = []
    processes = []
    for w in run.watched:
        cpu = (w.cpu1 - w.cpu0) / window * 100
        line = (
            f"  {w.label:<12} CPU {cpu:5.1f} % of a core, RSS {w.rss_end / 2**20:7.1f} MiB "
            f"(max {w.rss_max / 2**20:.1f}), fds max {w.fds_max} (at the end: "
            f"{', '.join(f'{n} {k}' for k, n in w.fds_end.items())})"
        )
        entry: dict[str, Any] = {
            "process": w.label,
            "cpu_percent": round(cpu, 1),
            "rss_mib": round(w.rss_end / 2**20, 1),
            "rss_max_mib": round(w.rss_max / 2**20, 1),
            "fds_max": w.fds_max,
            "fds_end": w.fds_end,
        }
        if w.label.startswith("node"):
            index = int(w.label[-1])
            held = holders.get(index, 0)
            growth = (w.rss_end - w.rss_idle) / 2**20
            each = growth / held if held else 0.0
            per_vm.append(each)
            is_cap = site_index(cap) == index
            line += (
                f", {held} VMs, RSS per VM {each:.3f} MiB"
                f" ({w.rss_idle / 2**20:.1f} MiB before any VM){' [the CAP]' if is_cap else ''}"
            )
            entry.update(vms=held, rss_per_vm_mib=round(each, 3), cap=is_cap)
        processes.append(entry)
        print(line)
    rss_per_vm = max(per_vm, default=0.0)
    print(f"RSS per replicated VM on a node (largest): {rss_per_vm:.3f} MiB (goal <= 1 MiB)")
    print(
        f"replicas compared with their images after the last write was acknowledged: "
        f"{len(vms) - len(mismatched)} equal, {len(mismatched)} differ"
        + ("" if caught_up else " (some VMs had not caught up in time)")
    )
    lag_max = max(worst, default=0.0)
    return {
        "name": "scale",
        "value": round(lag_max, 2),
        "unit": "s (worst lag of any VM: now - capture time of its last acknowledged batch)",
        "baseline": "the VMs' interval (a VM is late over 2x)",
        "baseline_value": args.interval,
        "ratio": round(lag_max / args.interval, 3),
        "vms": len(vms),
        "minutes": args.minutes,
        "lag_p50_s": round(percentile(samples, 0.5), 2),
        "lag_p99_s": round(percentile(samples, 0.99), 2),
        "lag_max_s": round(lag_max, 2),
        "over_2x_interval": len(over),
        "rss_per_vm_mib": round(rss_per_vm, 3),
        "mismatched_replicas": len(mismatched),
        "capture_to_ack_p50_s": round(percentile(to_ack, 0.5), 2),
        "capture_to_ack_p99_s": round(percentile(to_ack, 0.99), 2),
        "capture_to_ack_max_s": round(max(to_ack, default=0.0), 2),
        "capture_spacing_p99_s": round(percentile(spacing, 0.99), 2),
        "capture_spacing_max_s": round(max(spacing, default=0.0), 2),
        "payload_mbps": round(payload / window / 1e6, 3),
        "failed_cycles": failed,
        "refused_connections": refused,
        "caught_up": caught_up,
        "processes": processes,
    }


def site_index(node: NodeProcess) -> int:
    return node.index


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: one delta cycle (10 % of the 64 KiB blocks changed) against rsync --inplace.

Run from the repository root::

    .venv/bin/python bench/delta.py [--size-mib N] [--rounds N (default 5)]

Setup (not timed): an image of 1:1:2 zeros, random and text-like 1 MiB units (as in
bench/ir.py), replicated by an IR to a recovery server process (``frctl server run`` on
127.0.0.2; the primary binds 127.0.0.3), and copied as ``image.img`` into the module of
an rsync daemon (``rsync --daemon`` on 127.0.0.4, a free port). Both targets then hold the
image as it was.

Each round applies a fresh change set to the primary's image: 10 % of its 64 KiB blocks,
at random positions, overwritten with random data. Then, back to back (order alternating):

* **tracker cycle** (``value``): the written ranges are reported to the ChangeTracker
  attached to the replicator, and ``await VMReplicator.cycle()`` is timed: capture (the
  tracker's dirty blocks read into the pending log), connect, send the batch, the server
  journals it, applies it (undo data, fsyncs) and acknowledges;
* **rsync** (``baseline``): ``rsync --inplace --no-whole-file --stats <image>
  rsync://127.0.0.4:<port>/mod/image.img`` (``--stats`` only prints the counts); rsync
  finds the changes itself by reading and checksumming the whole file on both ends.

A second change set of the same round measures the **scan cycle**: the same replicator with
no tracker, so the capture reads the whole image and compares every block's XXH3-128 digest
with its digest map; against rsync on the same second change set.

Each tracker round also measures the **floor** on the same change set
(bench/delta_floor.py): a plain program doing only the work no design can avoid (read the
changed blocks, write them once to a log with one sync, send them over the TLS pipe of
bench/ir.py, write them once to a journal with one sync and once into an image), order
alternating with the cycle; ``floor_ratio`` is the median of cycle / floor. The tracker
cycle's **phases** come from timestamps both sides record (``VMReplicator.phases`` here,
the server's per-batch ``timings`` log line): capture, connect (TLS, negotiation, the
relationship open, which waits for the previous batch's apply), send (BatchBegin to the
server's receipt of BatchEnd), server receive, journal durable, ack (journal durable to
the primary's receipt of the Ack), and, after the Ack (off the cycle's path: the
pipelined commit), undo and apply.

Every value is image size / wall time ("effective" GB/s, as rsync reports speedup). The
image and the rsync copy are read once before each timed step (hot page cache on both
sides; the replica was written by the IR and the previous cycles). The ratios are medians
of the per-pair ratios. After the rounds the replica and the rsync copy are compared with
the image. CPU per side: this process (``getrusage``) and the server process (``/proc``);
for rsync the client (``RUSAGE_CHILDREN``) and the daemon with its reaped children.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delta_floor import Floor, FloorResult, read_digest_floor
from ir import (
    BLOCK,
    GIB,
    MIB,
    BenchSite,
    CycleResult,
    make_image,
    proc_cpu,
    read_through,
    same_content,
    timed_cycle,
)

from frtesting.server import ServerProcess
from node.primary.replicator import VMReplicator
from node.primary.tracker import ChangeTracker

RSYNC_HOST = "127.0.0.4"
CHANGED = 0.10
GOAL = 10.0
SCAN_GOAL = 4.0
FLOOR_GOAL = 1.5
#: The phases of a tracker cycle, in order; the last two run after the Ack.
PHASES = (
    "capture",
    "connect",
    "send",
    "server_receive",
    "journal_durable",
    "ack",
    "undo",
    "apply",
)


# -- rsync -----------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RsyncDaemon:
    proc: subprocess.Popen[bytes]
    port: int
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_rsync_daemon(root: Path, module_dir: Path) -> RsyncDaemon:
    """``rsync --daemon --no-detach`` on RSYNC_HOST, module ``mod`` at ``module_dir``."""
    conf = root / "rsyncd.conf"
    conf.write_text(
        f"""pid file = {root / "rsyncd.pid"}
use chroot = no
log file = {root / "rsyncd.log"}
uid = {os.getuid()}
gid = {os.getgid()}

[mod]
path = {module_dir}
read only = no
"""
    )
    for _ in range(5):
        port = free_port(RSYNC_HOST)
        proc = subprocess.Popen(
            [
                "rsync",
                "--daemon",
                "--no-detach",
                f"--config={conf}",
                f"--port={port}",
                f"--address={RSYNC_HOST}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection((RSYNC_HOST, port), timeout=1).close()
                return RsyncDaemon(proc, port, f"rsync://{RSYNC_HOST}:{port}/mod/image.img")
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise RuntimeError(f"the rsync daemon did not start: {(root / 'rsyncd.log').read_text()}")


@dataclass
class RsyncResult:
    seconds: float
    client_cpu: float
    daemon_cpu: float
    literal: int
    matched: int


def rsync_copy(root: Path, image: Path) -> tuple[Path, RsyncDaemon]:
    """A copy of ``image`` in an rsync module under ``root``, and the daemon serving it:
    rsync's target, as the replica is ours."""
    module = root / "rsync-mod"
    module.mkdir()
    copy = module / "image.img"
    shutil.copyfile(image, copy)
    return copy, start_rsync_daemon(root, module)


def _stat(output: str, label: str) -> int:
    for line in output.splitlines():
        if line.startswith(label):
            return int(line.split(":")[1].split()[0].replace(",", ""))
    raise RuntimeError(f"rsync --stats printed no {label!r}: {output}")


def run_rsync(daemon: RsyncDaemon, image: Path) -> RsyncResult:
    """``rsync --inplace --no-whole-file`` of ``image`` to the daemon, timed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_cpu0 = proc_cpu(daemon.proc.pid, children=True)
    start = time.perf_counter()
    done = subprocess.run(
        ["rsync", "--inplace", "--no-whole-file", "--stats", str(image), daemon.url],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    time.sleep(0.3)  # the daemon reaps its per-connection children on SIGCHLD
    daemon_cpu = proc_cpu(daemon.proc.pid, children=True) - daemon_cpu0
    return RsyncResult(
        seconds,
        client,
        daemon_cpu,
        _stat(done.stdout, "Literal data"),
        _stat(done.stdout, "Matched data"),
    )


# -- changes ---------------------------------------------------------------------------


def change_blocks(image: Path, rng: random.Random, fraction: float) -> list[int]:
    """Overwrite ``fraction`` of the 64 KiB blocks (random positions) with random data."""
    size = image.stat().st_size
    count = size // BLOCK
    blocks = sorted(rng.sample(range(count), max(1, int(count * fraction))))
    fd = os.open(image, os.O_WRONLY)
    try:
        for block in blocks:
            os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return blocks


def settle_writeback() -> None:
    """Write back every dirty page before a timed step, so that each step pays for its own
    writes only: the previous step's (an rsync's 102 MiB, a batch's apply and undo
    capture after its Ack) would otherwise be written back by the kernel during the next
    one, and slowed whichever came next (the floor measured right after a cycle ran 2-3x
    its time alone)."""
    os.sync()


def measure_cycle(
    replicator: VMReplicator,
    server: ServerProcess,
    image: Path,
    replica: Path,
    blocks: list[int],
) -> CycleResult:
    """Report the changes to the tracker (if any), warm the caches, time one cycle."""
    if replicator.tracker is not None:
        for block in blocks:
            replicator.tracker.report_write(0, block * BLOCK, BLOCK)
    read_through(image)
    read_through(replica)
    settle_writeback()
    before = replicator.state.sequence
    result = timed_cycle(replicator, server)
    if replicator.state.sequence != before + 1 or replicator.pending.cycles():
        raise RuntimeError("the cycle did not send exactly one batch")
    return result


def server_timings(server: ServerProcess, vmid: uuid.UUID, sequence: int) -> dict[str, float]:
    """The server's timestamps of one batch, from its log line (written once applied)."""
    prefix = f"batch {sequence} of {vmid} applied: timings "
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in server.log.read_text(errors="replace").splitlines():
            at = line.find(prefix)
            if at >= 0:
                pairs = (kv.split("=") for kv in line[at + len(prefix) :].split())
                return {k: float(v) for k, v in pairs}
        time.sleep(0.05)
    raise RuntimeError(f"the server logged no timings for batch {sequence}")


def cycle_phases(primary: dict[str, float], server: dict[str, float]) -> dict[str, float]:
    """Seconds per phase of one tracker cycle (PHASES), from both sides' timestamps."""
    return {
        "capture": primary["captured"] - primary["start"],
        "connect": primary["batch_begin"] - primary["captured"],
        "send": server["received"] - primary["batch_begin"],
        "server_receive": server["received"] - server["began"],
        "journal_durable": server["durable"] - server["received"],
        "ack": primary["acked"] - server["durable"],
        "undo": server["undone"] - server["acked"],
        "apply": server["applied"] - server["undone"],
    }


def measure_rsync(daemon: RsyncDaemon, image: Path, copy: Path, blocks: list[int]) -> RsyncResult:
    # rsync skips a file whose size and mtime match (its quick check); the copy was last
    # written by the previous rsync, possibly within the same second as the change: date it
    # an hour back, as a target last updated before the change would be.
    past = image.stat().st_mtime_ns - 3600 * 10**9
    os.utime(copy, ns=(past, past))
    read_through(image)
    read_through(copy)
    settle_writeback()
    result = run_rsync(daemon, image)
    if result.literal < len(blocks) * BLOCK // 2:
        raise RuntimeError(f"rsync sent only {result.literal} literal bytes: did it skip?")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the JSON line."""
    parser = argparse.ArgumentParser(description="delta cycle against rsync --inplace")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory parent")
    args = parser.parse_args(argv)
    if shutil.which("rsync") is None:
        print(
            "delta: rsync is not installed; it is the baseline of this benchmark.\n"
            "Install it (as root): apt-get install -y rsync   (scripts/bootstrap does this "
            "when it runs as root)",
            file=sys.stderr,
        )
        return 2
    rsync_version = subprocess.run(
        ["rsync", "--version"], check=True, capture_output=True, text=True
    ).stdout.split("\n")[0]
    size = args.size_mib * MIB
    gb = size / 1e9
    rng = random.Random(2)

    root = Path(tempfile.mkdtemp(prefix="frrep-bench-delta-", dir=args.tmp))
    server: ServerProcess | None = None
    daemon: RsyncDaemon | None = None
    try:
        site = BenchSite(root)
        image = root / "disk0.img"
        make_image(image, size)
        copy, daemon = rsync_copy(root, image)
        server = site.start_server()
        vmid = uuid.uuid4()
        tracker = ChangeTracker([size], BLOCK)
        replicator = site.replicator(vmid, image, server.port, tracker=tracker)
        ir = timed_cycle(replicator, server)
        replica = site.replica_image(vmid)
        print(
            f"delta: {size / GIB:.2f} GiB image (1:1:2 zeros/random/text), "
            f"{CHANGED:.0%} of its {BLOCK // 1024} KiB blocks changed per change set "
            f"({int(size // BLOCK * CHANGED)} blocks, random positions, random data)"
        )
        print(
            f"       setup IR {size / ir.seconds / 1e9:.2f} GB/s (not timed); {rsync_version}; "
            f"rsync daemon {RSYNC_HOST}:{daemon.port}; server process 127.0.0.2, primary 127.0.0.3"
        )
        print(
            f"       every source and target read once before each timed step (hot page "
            f"cache); {args.rounds} rounds, order alternating, medians"
        )
        # The first cycles after the IR write the server's first journal and undo file and
        # the primary's first pending-log file (later cycles write over spare files), and
        # on a freshly booted VM that page cache takes memory no process touched before:
        # each page's first touch costs the hypervisor work (here about 2.5 ms per MiB
        # against 0.3). A long-running site pays neither per cycle; the floor's files and
        # buffers are made and touched before its clock starts too. So one tracker and
        # one scan cycle run first, untimed, and are printed.
        warm: list[CycleResult] = []
        for kind in ("tracker", "scan"):
            blocks = change_blocks(image, rng, CHANGED)
            replicator.tracker = tracker if kind == "tracker" else None
            warm.append(measure_cycle(replicator, server, image, replica, blocks))
        print(
            f"       warm-up, not in the medians: the first tracker cycle after the IR "
            f"{warm[0].seconds:.3f} s, the first scan cycle {warm[1].seconds:.3f} s"
        )
        floor = Floor(site, root, image, int(size // BLOCK * CHANGED) * BLOCK)
        floors: list[FloorResult] = []  # paired with tracked
        phases: list[dict[str, float]] = []
        #: CPU seconds of the server's Trio thread within each tracker batch's receipt.
        receive_cpus: list[float] = []
        tracked: list[CycleResult] = []
        scans: list[CycleResult] = []
        rsyncs: list[RsyncResult] = []  # paired with tracked
        rsyncs_scan: list[RsyncResult] = []  # paired with scans
        scan_floors: list[float] = []  # paired with scans
        payload = 0
        for r in range(args.rounds):
            for kind in ("tracker", "scan"):
                blocks = change_blocks(image, rng, CHANGED)
                payload = len(blocks) * BLOCK
                replicator.tracker = tracker if kind == "tracker" else None
                cycles = tracked if kind == "tracker" else scans
                peers = rsyncs if kind == "tracker" else rsyncs_scan
                if r % 2 == 0:
                    peers.append(measure_rsync(daemon, image, copy, blocks))
                    cycles.append(measure_cycle(replicator, server, image, replica, blocks))
                else:
                    cycles.append(measure_cycle(replicator, server, image, replica, blocks))
                    peers.append(measure_rsync(daemon, image, copy, blocks))
                if kind == "tracker":
                    seq = replicator.state.sequence
                    timings = server_timings(server, vmid, seq)
                    phases.append(cycle_phases(dict(replicator.phases), timings))
                    receive_cpus.append(timings["receive_cpu"])
                    read_through(image)
                    settle_writeback()
                    floors.append(floor.run(image, blocks))
                else:
                    # A scan may overlap its read with the sending: its floor is the
                    # larger of the whole image's read+digest and this round's floor.
                    read_through(image)
                    settle_writeback()
                    scan_floors.append(max(read_digest_floor(image, size), floors[-1].seconds))
            print(
                f"       round {r + 1}: tracker {tracked[-1].seconds:.3f} s, floor "
                f"{floors[-1].seconds:.3f} s, rsync {rsyncs[-1].seconds:.3f} s; scan "
                f"{scans[-1].seconds:.3f} s, rsync {rsyncs_scan[-1].seconds:.3f} s"
            )
        if not same_content(image, site.replica_image(vmid)):  # once the last apply ended
            raise RuntimeError("the replica differs from the image")
        if not same_content(image, copy):
            raise RuntimeError("the rsync copy differs from the image")
    finally:
        if server is not None:
            server.stop()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)

    def med(values: Any) -> float:
        return float(statistics.median(values))

    all_rsync = rsyncs + rsyncs_scan
    ratios = sorted(p.seconds / c.seconds for p, c in zip(rsyncs, tracked, strict=True))
    scan_ratios = sorted(p.seconds / c.seconds for p, c in zip(rsyncs_scan, scans, strict=True))
    ratio, scan_ratio = statistics.median(ratios), statistics.median(scan_ratios)
    floor_ratios = sorted(c.seconds / f.seconds for c, f in zip(tracked, floors, strict=True))
    floor_ratio = statistics.median(floor_ratios)
    floor_rsync = statistics.median(
        p.seconds / f.seconds for p, f in zip(rsyncs, floors, strict=True)
    )
    floor_seconds = med(f.seconds for f in floors)
    scan_floor_rsync = statistics.median(
        p.seconds / f for p, f in zip(rsyncs_scan, scan_floors, strict=True)
    )
    scan_floor_ratio = statistics.median(
        c.seconds / f for c, f in zip(scans, scan_floors, strict=True)
    )
    phase = {k: med(p[k] for p in phases) for k in PHASES}
    floor_phase = {k: med(f.phases()[k] for f in floors) for k in floors[0].phases()}
    receive_cpu = med(receive_cpus)
    floor_receive_cpu = med(f.receive_cpu for f in floors)
    trio_cpu = med(c.trio_cpu for c in tracked)
    floor_send_cpu = med(f.send_cpu for f in floors)
    base = gb / med(p.seconds for p in all_rsync)
    value = gb / med(c.seconds for c in tracked)
    scan_value = gb / med(c.seconds for c in scans)
    cpu = {
        "tracker_primary_cpu_s_per_gb": med(c.primary_cpu for c in tracked) / gb,
        "tracker_server_cpu_s_per_gb": med(c.server_cpu for c in tracked) / gb,
        "scan_primary_cpu_s_per_gb": med(c.primary_cpu for c in scans) / gb,
        "scan_server_cpu_s_per_gb": med(c.server_cpu for c in scans) / gb,
        "rsync_client_cpu_s_per_gb": med(p.client_cpu for p in all_rsync) / gb,
        "rsync_daemon_cpu_s_per_gb": med(p.daemon_cpu for p in all_rsync) / gb,
    }
    print(
        f"baseline  rsync --inplace --no-whole-file via daemon {base:7.3f} GB/s eff.  "
        f"({med(p.seconds for p in all_rsync):.2f} s; literal "
        f"{med(p.literal for p in all_rsync) / MIB:.0f} MiB, matched "
        f"{med(p.matched for p in all_rsync) / MIB:.0f} MiB; CPU s/GB client "
        f"{cpu['rsync_client_cpu_s_per_gb']:.2f}, daemon {cpu['rsync_daemon_cpu_s_per_gb']:.2f})"
    )
    print(
        f"tracker   VMReplicator.cycle(), ChangeTracker   {value:7.3f} GB/s eff.  "
        f"({med(c.seconds for c in tracked):.3f} s; payload "
        f"{payload / med(c.seconds for c in tracked) / 1e9:.3f} GB/s; CPU s/GB primary "
        f"{cpu['tracker_primary_cpu_s_per_gb']:.3f}, server "
        f"{cpu['tracker_server_cpu_s_per_gb']:.3f})"
    )
    print(
        f"          ratio {ratio:.2f} (goal >= {GOAL:g}; rounds {ratios[0]:.2f}-{ratios[-1]:.2f}) "
        f"{'MET' if ratio >= GOAL else 'MISSED'}"
    )
    print(
        f"scan      VMReplicator.cycle(), digest scan     {scan_value:7.3f} GB/s eff.  "
        f"({med(c.seconds for c in scans):.3f} s; CPU s/GB primary "
        f"{cpu['scan_primary_cpu_s_per_gb']:.3f}, server {cpu['scan_server_cpu_s_per_gb']:.3f})"
    )
    print(
        f"          ratio {scan_ratio:.2f} (goal >= {SCAN_GOAL:g}; rounds {scan_ratios[0]:.2f}-"
        f"{scan_ratios[-1]:.2f}) {'MET' if scan_ratio >= SCAN_GOAL else 'MISSED'}"
    )
    print(
        f"          scan floor: the whole image read and digested (best of 1 and 2 threads) "
        f"or the round's floor, the larger: {med(scan_floors):.3f} s, {scan_floor_rsync:.2f}x "
        f"rsync; scan cycle / scan floor {scan_floor_ratio:.2f}"
    )
    if scan_floor_rsync < SCAN_GOAL and scan_floor_ratio < 1:
        print(
            f"          no claim on {SCAN_GOAL:g}x: the scan beat its floor in this run, so the "
            "floor is no bound here"
        )
    elif scan_floor_rsync < SCAN_GOAL:
        print(
            f"          {SCAN_GOAL:g}x rsync is out of reach for a scan on this machine: its "
            f"floor itself is {scan_floor_rsync:.2f}x rsync"
        )
    print("          (CPU s/GB: per GB of image, as the effective rates)")
    print(
        f"floor     read, log+sync, TLS send, journal+sync, image write "
        f"{gb / floor_seconds:7.3f} GB/s eff.  ({floor_seconds:.3f} s; "
        f"{floor_rsync:.2f}x rsync: the most any design reaches here)"
    )
    print("          " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in floor_phase.items()))
    print(
        f"          cycle / floor {floor_ratio:.2f} (goal <= {FLOOR_GOAL:g}; rounds "
        f"{floor_ratios[0]:.2f}-{floor_ratios[-1]:.2f}) "
        f"{'MET' if floor_ratio <= FLOOR_GOAL else 'MISSED'}"
    )
    if floor_rsync < GOAL and floor_ratio < 1:
        print(
            f"          no claim on {GOAL:g}x: the cycle beat the floor in this run, so the "
            "floor is no bound here"
        )
    elif floor_rsync < GOAL:
        print(
            f"          {GOAL:g}x rsync is out of reach on this machine: the floor itself is "
            f"{floor_rsync:.2f}x rsync"
        )
    # server_receive lies within send (the same bytes, seen from the other end).
    on_path = sum(phase[k] for k in ("capture", "connect", "send", "journal_durable", "ack"))
    print(
        "phases    tracker cycle, medians (ms): "
        + ", ".join(f"{k} {phase[k] * 1000:.0f}" for k in PHASES[:6])
        + f" (on the path, server_receive within send: {on_path * 1000:.0f} of "
        + f"{med(c.seconds for c in tracked) * 1000:.0f}); after the Ack: "
        + ", ".join(f"{k} {phase[k] * 1000:.0f}" for k in PHASES[6:])
    )
    # Why the send takes what it takes: the receiving thread's own CPU, beside the floor's
    # receiver doing the same bytes in 1 MiB pieces (no per-chunk work).
    print(
        f"receiver  the server's Trio thread ran {receive_cpu * 1000:.0f} ms of CPU in its "
        f"{phase['server_receive'] * 1000:.0f} ms receipt of the batch "
        f"({receive_cpu / phase['server_receive']:.0%}); the floor's receiver "
        f"{floor_receive_cpu * 1000:.0f} ms in its {floor_phase['send_receive'] * 1000:.0f} ms "
        "(medians)"
    )
    # And the sending side: the primary's Trio thread (connection, negotiation, send; the
    # capture runs in worker threads) beside the floor's sender (handshake and send).
    sending = phase["connect"] + phase["send"]
    print(
        f"sender    the primary's Trio thread ran {trio_cpu * 1000:.0f} ms of CPU in the "
        f"cycle's connect and send ({sending * 1000:.0f} ms, {trio_cpu / sending:.0%}); "
        f"the floor's sender {floor_send_cpu * 1000:.0f} ms (medians)"
    )
    result: dict[str, Any] = {
        "name": "delta",
        "value": round(value, 3),
        "unit": "GB/s",
        "baseline": "rsync --inplace --no-whole-file via rsync daemon on loopback, same change",
        "baseline_value": round(base, 3),
        "ratio": round(ratio, 2),
        "scan_ratio": round(scan_ratio, 2),
        "scan_floor_seconds": round(med(scan_floors), 3),
        "scan_floor_vs_rsync": round(scan_floor_rsync, 2),
        "scan_floor_ratio": round(scan_floor_ratio, 2),
        "scan_value": round(scan_value, 3),
        "goal_ratio": GOAL,
        "goal_scan_ratio": SCAN_GOAL,
        "floor_ratio": round(floor_ratio, 2),
        "floor_seconds": round(floor_seconds, 3),
        "floor_vs_rsync": round(floor_rsync, 2),
        "goal_floor_ratio": FLOOR_GOAL,
        "phases": {k: round(v, 4) for k, v in phase.items()},
        "floor_phases": {k: round(v, 4) for k, v in floor_phase.items()},
        "server_receive_cpu": round(receive_cpu, 4),
        "floor_receive_cpu": round(floor_receive_cpu, 4),
        "primary_trio_cpu": round(trio_cpu, 4),
        "floor_send_cpu": round(floor_send_cpu, 4),
        "floor_ratio_min_round": round(floor_ratios[0], 2),
        "floor_ratio_max_round": round(floor_ratios[-1], 2),
        "ratio_min_round": round(ratios[0], 2),
        "ratio_max_round": round(ratios[-1], 2),
        "scan_ratio_min_round": round(scan_ratios[0], 2),
        "scan_ratio_max_round": round(scan_ratios[-1], 2),
        "image_bytes": size,
        "changed_bytes": payload,
        "warmup_seconds": {"tracker": round(warm[0].seconds, 3), "scan": round(warm[1].seconds, 3)},
        "tracker_seconds": [round(c.seconds, 3) for c in tracked],
        "scan_seconds": [round(c.seconds, 3) for c in scans],
        "rsync_seconds": [round(p.seconds, 3) for p in rsyncs],
        "rsync_scan_seconds": [round(p.seconds, 3) for p in rsyncs_scan],
        **{k: round(v, 3) for k, v in cpu.items()},
        "page_cache": "sources and targets read once before each timed step (hot)",
        "rounds": args.rounds,
    }
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

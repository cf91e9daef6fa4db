"""Benchmark: a delta cycle and an IR with QEMU as the change source, against the files.

Run from the repository root::

    .venv/bin/python bench/qemu_source.py [--size-mib N] [--rounds N]

Setup (not timed): an image of 1:1:2 zeros, random and text-like 1 MiB units (as in
bench/ir.py) as a raw file, and the same image converted to qcow2 (``qemu-img convert``:
the zero units stay unallocated) served by ``qemu-storage-daemon`` (frtesting.qemu; no
KVM). Two VMs replicate to one recovery server process (127.0.0.2; the primary binds
127.0.0.3): **files**, the raw image with a ChangeTracker (bench/delta.py's tracker
cycle), and **qemu**, the qcow2 through QEMU (docs/qemu.md).

* **IR** (up to 3 rounds, a new VM of each kind per round, order alternating): the
  first cycle, timed: the file IR reads the raw file (bench/ir.py's IR;
  ``ir_baseline_value``), the QEMU IR reads the point in time over NBD, skipping the
  unallocated extents (``ir_value``); ``ir_ratio`` is the median of per-round (file
  time / QEMU time). Goal: >= 0.7.
* **cycle** (``value``): each round writes 10 % of the 64 KiB blocks (random positions,
  random data) to both: to the raw file (reported to the tracker) and through QEMU
  (NBD, as the guest would). Then, order alternating, one ``VMReplicator.cycle()`` each:
  files = tracker's dirty blocks read from the file; qemu = the QMP transaction
  (bitmap + fleecing), the frozen bitmap read as NBD block status, the dirty blocks read
  over NBD, the cleanup. Both then send, journal, apply and acknowledge. ``ratio`` is the
  median of per-round (files time / qemu time). Goal: >= 0.7.

Values are image size / wall time ("effective" GB/s). Page cache hot on both sides (the
raw image and the qcow2 are read once before each timed step). After the rounds both
replicas are compared with the image the guest sees.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ir import BLOCK, GIB, MIB, BenchSite, CycleResult, make_image, read_through, timed_cycle

from frtesting.qemu import Disk, QemuDaemon, missing_qemu
from node.primary.replicator import VMReplicator
from node.primary.state import IRStage, PrimaryStateStore, VMReplicationState
from node.primary.tracker import ChangeTracker

CHANGED = 0.10
GOAL = 0.7


def qemu_replicator(site: BenchSite, daemon: QemuDaemon, port: int, size: int) -> VMReplicator:
    """A replicator of the daemon's one-disk VM, QEMU its change source."""
    from ir import PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME

    from frlink.tls import client_context

    store = PrimaryStateStore(site.state_dir)
    disk = daemon.disks[0]
    state = VMReplicationState(
        vmid=str(uuid.uuid4()),
        name="bench-qemu",
        disks=[{"disk_id": "disk0", "path": str(disk.image), "size": size, "qemu_node": "disk0"}],
        block_size=BLOCK,
        recovery_host=SERVER_HOST,
        recovery_port=port,
        server_name=SERVER_NAME,
        frequency_s=60.0,
        qemu={"qmp": daemon.qmp_socket, "nbd": daemon.nbd_socket},
    )
    store.save(state)
    ctx = client_context(*site.cert(PRIMARY_NAME))
    return VMReplicator(state, store, ctx, local_address=PRIMARY_HOST)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the JSON line."""
    parser = argparse.ArgumentParser(description="QEMU change source against the files")
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory parent")
    args = parser.parse_args(argv)
    missing = missing_qemu()
    if missing is not None:
        print(f"qemu_source: {missing} (scripts/bootstrap installs it as root)", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    gb = size / 1e9
    rng = random.Random(3)
    root = Path(tempfile.mkdtemp(prefix="frrep-bench-qemu-", dir=args.tmp))
    server = daemon = None
    try:
        site = BenchSite(root)
        raw = root / "disk0.img"
        make_image(raw, size)
        qcow2 = root / "disk0.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
            check=True,
        )
        daemon = QemuDaemon(root / "qemu", [Disk("disk0", qcow2, "qcow2")]).start()
        guest = daemon.writer("disk0")
        server = site.start_server()
        version = subprocess.run(
            ["qemu-img", "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        print(
            f"qemu_source: {size / GIB:.2f} GiB image (1:1:2 zeros/random/text), raw file "
            f"with a ChangeTracker vs qcow2 through qemu-storage-daemon ({version})"
        )
        # IR rounds: a new VM of each kind per round (order alternating); the last pair
        # goes on with the cycles.
        irs: list[tuple[CycleResult, CycleResult]] = []
        for r in range(min(args.rounds, 3)):
            tracker = ChangeTracker([size], BLOCK)
            files = site.replicator(uuid.uuid4(), raw, server.port, tracker=tracker)
            qemu = qemu_replicator(site, daemon, server.port, size)
            done: dict[str, CycleResult] = {}
            for kind in ("files", "qemu") if r % 2 == 0 else ("qemu", "files"):
                read_through(raw)
                read_through(qcow2)
                done[kind] = timed_cycle(files if kind == "files" else qemu, server)
            if files.state.ir_state != IRStage.COMPLETE or qemu.state.ir_state != IRStage.COMPLETE:
                raise RuntimeError("an IR did not complete")
            irs.append((done["files"], done["qemu"]))
            print(
                f"      IR round {r + 1}: files {gb / done['files'].seconds:.3f} GB/s, QEMU "
                f"over NBD {gb / done['qemu'].seconds:.3f} GB/s (unallocated extents not read)"
            )
        pairs: list[tuple[CycleResult, CycleResult]] = []
        count = size // BLOCK
        for r in range(args.rounds):
            blocks = sorted(rng.sample(range(count), max(1, int(count * CHANGED))))
            fd = os.open(raw, os.O_WRONLY)
            try:
                for block in blocks:
                    data = rng.randbytes(BLOCK)
                    os.pwrite(fd, data, block * BLOCK)
                    tracker.report_write(0, block * BLOCK, BLOCK)
                    guest.write(block * BLOCK, data)
            finally:
                os.close(fd)
            results: dict[str, CycleResult] = {}
            for kind in ("files", "qemu") if r % 2 == 0 else ("qemu", "files"):
                replicator = files if kind == "files" else qemu
                read_through(raw)
                read_through(qcow2)
                before = replicator.state.sequence
                results[kind] = timed_cycle(replicator, server)
                if replicator.state.sequence != before + 1:
                    raise RuntimeError(f"the {kind} cycle did not send one batch")
            pairs.append((results["files"], results["qemu"]))
            print(
                f"      round {r + 1}: files {gb / results['files'].seconds:.2f} GB/s eff., "
                f"qemu {gb / results['qemu'].seconds:.2f} GB/s eff."
            )
        replicas = [site.replica_image(uuid.UUID(r.state.vmid)) for r in (files, qemu)]
        for replica in replicas:
            with replica.open("rb") as f:
                for at in range(0, size, 64 * MIB):
                    if f.read(64 * MIB) != guest.read(at, min(64 * MIB, size - at)):
                        raise RuntimeError(f"the replica {replica} differs from the guest's disk")
        guest.close()
    finally:
        if server is not None:
            server.stop()
        if daemon is not None:
            daemon.kill()
        shutil.rmtree(root, ignore_errors=True)

    def med(values: Any) -> float:
        return float(statistics.median(values))

    ratios = sorted(f.seconds / q.seconds for f, q in pairs)
    ratio = statistics.median(ratios)
    value = gb / med(q.seconds for _, q in pairs)
    base = gb / med(f.seconds for f, _ in pairs)
    ir_ratio = statistics.median(f.seconds / q.seconds for f, q in irs)
    ir_files_gbps = gb / med(f.seconds for f, _ in irs)
    ir_qemu_gbps = gb / med(q.seconds for _, q in irs)
    print(f"files     tracker cycle (bench/delta.py's)  {base:7.3f} GB/s eff.")
    print(f"qemu      QEMU dirty bitmap + fleecing      {value:7.3f} GB/s eff.")
    print(
        f"ratio     cycle {ratio:.3f} (goal >= {GOAL}; rounds {ratios[0]:.3f}-{ratios[-1]:.3f}) "
        f"{'MET' if ratio >= GOAL else 'MISSED'}; IR {ir_ratio:.3f} "
        f"{'MET' if ir_ratio >= GOAL else 'MISSED'}"
    )
    result: dict[str, Any] = {
        "name": "qemu_source",
        "value": round(value, 3),
        "unit": "GB/s",
        "baseline": "the same change as a ChangeTracker-fed cycle of the raw image file",
        "baseline_value": round(base, 3),
        "ratio": round(ratio, 3),
        "goal_ratio": GOAL,
        "ir_value": round(ir_qemu_gbps, 3),
        "ir_baseline_value": round(ir_files_gbps, 3),
        "ir_ratio": round(ir_ratio, 3),
        "image_bytes": size,
        "changed_bytes": int(count * CHANGED) * BLOCK,
        "qemu_seconds": [round(q.seconds, 3) for _, q in pairs],
        "files_seconds": [round(f.seconds, 3) for f, _ in pairs],
        "rounds": args.rounds,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

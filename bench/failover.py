"""Broker failover: seconds from kill -9 of the broker's node until the CAP answers again.

Run as ``.venv/bin/python bench/failover.py`` (about 30 s). For each cluster store
(SQLite, the embedded default; etcd, a 3-member cluster started by the benchmark), a
cluster of 3 real node processes on loopback elects a broker at the CAP (127.0.0.10).
Each round kills the broker's node with SIGKILL and then, from this process as a
primary, asks the CAP (a new mutual-TLS connection, QueryRecoveryServer for a new VM) in
a tight loop until an answer comes: the time from the kill to that answer is the
failover time. The killed node is restarted (it rejoins as a node) before the next round.

The **baseline** is the election lease's TTL (``lease_ttl``, 1 s here): how long the
dead node's lease outlives it, the floor of any failover that waits for the lease.
``value`` is the median failover of the slower store (seconds); ``ratio`` = value /
baseline. Goal: value <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frtesting.cluster import ClusterSite
from frtesting.etcd import etcd_cluster, find_etcd

LEASE_TTL = 1.0


async def _answered(site: ClusterSite) -> bool:
    """One attempt at the CAP: True if it answered a query."""
    try:
        with trio.fail_after(1.0):
            answer = await site.query(uuid.uuid4())
    except (OSError, trio.TooSlowError, fp.FrprotoError, trio.BrokenResourceError):
        return False
    return answer.existing is fp.ExistingVM.NEW


def failover_round(site: ClusterSite) -> tuple[float, str, str]:
    """Kill the broker's node; seconds until the CAP answers, and who moved where."""
    broker = site.broker_node()
    broker.kill()
    killed = time.monotonic()
    while not trio.run(_answered, site):
        if time.monotonic() - killed > 30:
            raise RuntimeError("the CAP did not answer within 30 s")
        time.sleep(0.01)
    seconds = time.monotonic() - killed
    survivor = site.broker_node()
    site.start(broker.index)  # back as a node for the next round
    return seconds, broker.name, survivor.name


def run_store(name: str, root: Path, url: str, rounds: int) -> dict[str, Any]:
    site = ClusterSite(root, nodes=3, store_url=url, lease_ttl=LEASE_TTL)
    try:
        site.authorize_primary()
        site.start_all()
        site.broker_node(timeout=30)
        if not trio.run(_answered, site):
            raise RuntimeError("the CAP does not answer before the first kill")
        times = []
        for r in range(rounds):
            seconds, old, new = failover_round(site)
            times.append(seconds)
            print(
                f"  {name:<6} round {r + 1}: broker {old} killed; {new} answers at the CAP "
                f"after {seconds:.2f} s"
            )
    finally:
        site.stop_all()
    return {
        "store": name,
        "median_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
        "rounds_s": [round(t, 3) for t in times],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures, then the JSON line."""
    parser = argparse.ArgumentParser(description="broker failover time")
    parser.add_argument("--rounds", type=int, default=3, help="kills per store")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch directory parent")
    parser.add_argument("--no-etcd", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="frrep-bench-failover-", dir=args.tmp))
    print(
        f"failover: 3 node processes, lease_ttl {LEASE_TTL} s; kill -9 the broker's node, "
        f"then ask the CAP until it answers; {args.rounds} rounds per store"
    )
    results = []
    try:
        results.append(run_store("sqlite", root / "sqlite", "", args.rounds))
        if not args.no_etcd:
            if find_etcd() is None:
                print("failover: no etcd binary (install the dev extra)", file=sys.stderr)
                return 2
            with etcd_cluster(3) as etcd:
                results.append(run_store("etcd", root / "etcd", etcd.url, args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    slow = max(results, key=lambda r: r["median_s"])
    for r in results:
        print(f"{r['store']:<7} median {r['median_s']:.2f} s, worst {r['max_s']:.2f} s")
    print(f"slower store: {slow['store']}, {slow['median_s']:.2f} s (goal <= 3 s)")
    print(
        json.dumps(
            {
                "name": "failover",
                "value": slow["median_s"],
                "unit": "s (kill -9 of the broker's node to the CAP's next answer)",
                "baseline": "the election lease's TTL (how long a dead node's lease lives)",
                "baseline_value": LEASE_TTL,
                "ratio": round(slow["median_s"] / LEASE_TTL, 2),
                "goal_s": 3.0,
                "worst_s": max(r["max_s"] for r in results),
                "slower_store": slow["store"],
                "stores": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

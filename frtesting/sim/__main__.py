"""``scripts/simulate``: run seeds of the simulation, replay one, shrink a failure.

The last line printed is one JSON object: ``seeds``, ``simulated_hours``, ``faults`` (by
kind), ``failures`` (runs with a violated invariant), and ``failed_seeds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

from .cluster import CLUSTER_KINDS
from .faults import KINDS
from .runner import RunResult, run_cluster_seed, run_seed, shrink


def _parse_faults(text: str | None) -> list[int] | None:
    if text is None:
        return None
    if text == "none":
        return []
    return [int(part) for part in text.split(",") if part]


def _summary_of(
    seed: int, cluster: bool = False, primaries: int | None = None
) -> tuple[int, float, dict[str, int], list[str], str]:
    """One run, as the pool sends it back (no trace: it stays in the worker)."""
    result = run_cluster_seed(seed) if cluster else run_seed(seed, primaries=primaries)
    return (
        seed,
        result.simulated_seconds,
        dict(result.faults),
        result.failures,
        result.replay_command(),
    )


def run_summaries(
    first: int, count: int, jobs: int, cluster: bool, primaries: int | None = None
) -> Iterator[tuple[int, float, dict[str, int], list[str], str]]:
    """Run ``count`` seeds from ``first`` in ``jobs`` processes: per seed, in seed order,
    ``(seed, simulated seconds, faults by kind, failures, replay command)``;
    ``primaries``: every world has this many primary hosts (the stand-alone world)."""
    seeds = range(first, first + count)
    flags = [cluster] * count
    sizes = [primaries] * count
    if jobs <= 1:
        yield from map(_summary_of, seeds, flags, sizes)
        return
    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_summary_of, seeds, flags, sizes, chunksize=4)


def _report_failure(result: RunResult, *, do_shrink: bool) -> None:
    print(f"seed {result.seed} FAILED: " + "; ".join(result.failures))
    print(f"  replay: {result.replay_command()}")
    if do_shrink:
        small = shrink(result)
        kept = [result.schedule[i].describe() for i in small.applied]
        print(f"  shrunk to {len(small.applied)} of {len(result.applied)} faults: {kept}")
        print(f"  replay: {small.replay_command()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__)
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=0, help="run this many seeds")
    parser.add_argument("--start", type=int, default=1, help="first seed of --seeds")
    parser.add_argument("--faults", help="with --seed: only these faults (indices, or none)")
    parser.add_argument("--trace", action="store_true", help="with --seed: print the trace")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink failures")
    parser.add_argument("--jobs", type=int, default=1, help="processes running seeds")
    parser.add_argument(
        "--cluster", action="store_true", help="simulate a cluster (3-5 nodes, broker, CAP)"
    )
    parser.add_argument(
        "--primaries",
        type=int,
        help="every world has this many primary hosts, N to 2N VMs (a big world; "
        "without it 1.5%% of the seeds draw 2 to 12 hosts and up to 50 VMs)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.seed is not None:
        keep = _parse_faults(args.faults)
        if args.cluster:
            result = run_cluster_seed(args.seed, keep=keep)
        else:
            result = run_seed(args.seed, keep=keep, primaries=args.primaries)
        if args.trace:
            print("\n".join(result.trace))
        for i, fault in enumerate(result.schedule):
            mark = "*" if i in result.applied else " "
            print(f"{mark} fault {i}: at {fault.at:.3f}s {fault.describe()}")
        if not result.ok:
            _report_failure(result, do_shrink=not args.no_shrink)
        runs = [(result.seed, result.simulated_seconds, dict(result.faults), result.failures)]
    else:
        count = args.seeds or 100
        runs = []
        for done, (seed, seconds, kinds, failures, replay) in enumerate(
            run_summaries(args.start, count, args.jobs, args.cluster, args.primaries), 1
        ):
            runs.append((seed, seconds, kinds, failures))
            if failures:
                print(f"seed {seed} FAILED: {'; '.join(failures)}\n  replay: {replay}", flush=True)
            if done % 100 == 0:
                rate = done / (time.monotonic() - started)
                print(f"{done}/{count} seeds ({rate:.2f} seeds/s)", file=sys.stderr, flush=True)
        if not args.no_shrink:
            for seed, *_ in [r for r in runs if r[3]][:3]:
                again = (
                    run_cluster_seed(seed)
                    if args.cluster
                    else run_seed(seed, primaries=args.primaries)
                )
                _report_failure(again, do_shrink=True)
    elapsed = time.monotonic() - started
    faults: Counter[str] = Counter()
    for run in runs:
        faults.update(run[2])
    failed = [run[0] for run in runs if run[3]]
    hours = sum(run[1] for run in runs) / 3600
    print()
    print(f"{'seeds':<28}{len(runs):>10}")
    print(f"{'simulated hours':<28}{hours:>10.2f}")
    table = CLUSTER_KINDS if args.cluster else KINDS
    for kind in table:
        print(f"{'faults: ' + kind:<28}{faults[kind]:>10}")
    print(f"{'invariant failures':<28}{len(failed):>10}")
    print(f"{'real seconds':<28}{elapsed:>10.1f}  ({len(runs) / elapsed:.2f} seeds/s)")
    print(
        json.dumps(
            {
                "seeds": len(runs),
                "simulated_hours": round(hours, 3),
                "faults": {kind: faults[kind] for kind in table},
                "failures": len(failed),
                "failed_seeds": failed,
            }
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory per idle connection, and memory given back when connections close.

Runs against real processes on loopback: a stand-alone recovery server
(``frctl server run``) and the broker's node of a one-node cluster (``frctl node run``,
connections to its CAP). For each state a hostile or merely slow peer can leave a
connection in, it opens ``--hold`` connections, holds them while the process's RSS is
read, closes them, and opens and closes more in rounds until ``--connections`` were
opened in that state:

* ``tcp``: connected, nothing sent (before TLS);
* ``tls``: TLS handshake done, nothing sent (before the NegotiateRequest);
* ``negotiated``: negotiated, then idle (READY);
* ``mid-frame``: TLS, then half a NegotiateRequest frame;
* ``mid-body``: negotiated, then a frame declaring a 2 MiB body with 1 MiB of it sent
  (``--mid-body`` connections: each holds the 1 MiB it sent, by nature).

Figures: KiB of RSS per connection held, by state, and the RSS at the start (the
baseline) against the RSS after every connection closed. The JSON line's ``value`` is the
worst KiB per idle connection held (tcp, tls, negotiated, mid-frame) over both processes;
``ratio`` is the worst RSS-after-close / RSS-at-start. Goals (issue 21): <= 64 KiB per
idle connection; RSS after all closes within 10 % (or 20 MB) of the start.

Options: ``--connections`` (1000), ``--hold`` (500), ``--mid-body`` (40), ``--targets``
(server,broker), ``--settle`` (seconds to wait before reading RSS, 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import frproto as fp
from frlink.certs import create_ca, issue_host_cert
from frlink.connections import TRIM_INTERVAL
from frlink.tls import client_context, tls_connect
from frproto._wire import ENVELOPE
from frproto.trio_io import FramedStream
from frtesting.cluster import CAP_ADDRESS, CAP_NAME, ClusterSite
from frtesting.server import start_server_process

SERVER_HOST = "127.0.0.2"
SERVER_NAME = "r1.example.com"
PRIMARY_NAME = "p1.primary.example.com"
IDLE_STATES = ("tcp", "tls", "negotiated", "mid-frame")
#: Bounds and deadlines high enough that nothing the bench holds is refused or timed out.
CONNECTIONS = """max = 100000
max_per_address = 100000
max_negotiating = 100000
max_handshaking = 100000
negotiate_timeout = 3600
ready_timeout = 3600
session_timeout = 3600
frame_timeout = 3600
"""
MIB = 1024 * 1024


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Target:
    """Where to connect, as whom, and which process to measure."""

    def __init__(self, name: str, pid: int, host: str, port: int, sni: str, ctx: Any) -> None:
        self.name, self.pid, self.host, self.port, self.sni, self.ctx = (
            name,
            pid,
            host,
            port,
            sni,
            ctx,
        )

    async def tcp(self) -> trio.abc.Stream:
        return await trio.open_tcp_stream(self.host, self.port)

    async def tls(self) -> trio.abc.Stream:
        return await tls_connect(self.host, self.port, self.ctx, server_name=self.sni)

    async def negotiated(self) -> trio.abc.Stream:
        stream = await self.tls()
        framed = FramedStream(stream, fp.Connection(fp.Role.PRIMARY))
        await framed.send(fp.NegotiateRequest())
        answer = await framed.expect(fp.NegotiateResponse)
        assert isinstance(answer, fp.NegotiateResponse)
        assert answer.ok, answer
        return stream

    async def mid_frame(self) -> trio.abc.Stream:
        stream = await self.tls()
        frame = fp.Connection(fp.Role.PRIMARY).send(fp.NegotiateRequest())
        await stream.send_all(frame[: len(frame) // 2])
        return stream

    async def mid_body(self) -> trio.abc.Stream:
        stream = await self.negotiated()
        tag = fp.QueryRecoveryServer.TAG  # a control message: its body may be 2 MiB
        await stream.send_all(ENVELOPE.pack(0, tag, 2 * MIB) + bytes(MIB))
        return stream

    def opener(self, state: str) -> Callable[[], Awaitable[trio.abc.Stream]]:
        return getattr(self, state.replace("-", "_"))  # type: ignore[no-any-return]


async def open_many(open_one: Callable[[], Awaitable[trio.abc.Stream]], n: int) -> list[Any]:
    streams: list[Any] = []
    limiter = trio.CapacityLimiter(32)

    async def one() -> None:
        async with limiter:
            streams.append(await open_one())

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return streams


async def close_all(streams: list[Any]) -> None:
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def measure(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Open, hold, and close connections in each state; RSS figures of ``target``."""
    await trio.sleep(args.settle)
    start = rss_kib(target.pid)
    per_conn: dict[str, float] = {}
    for state in (*IDLE_STATES, "mid-body"):
        total = args.mid_body if state == "mid-body" else args.connections
        hold = min(args.hold, total)
        before = rss_kib(target.pid)
        opened = 0
        while opened < total:
            n = min(hold, total - opened)
            streams = await open_many(target.opener(state), n)
            opened += n
            if opened == n:  # the first round is held and measured
                await trio.sleep(args.settle)
                per_conn[state] = (rss_kib(target.pid) - before) / n
            await close_all(streams)
        # The process trims freed memory at most once per TRIM_INTERVAL after closes.
        await trio.sleep(args.settle + TRIM_INTERVAL)
        print(
            f"  {target.name} {state:<10} {per_conn[state]:8.1f} KiB per connection held "
            f"({hold} held, {opened} opened and closed); RSS after close "
            f"{rss_kib(target.pid) / 1024:.1f} MB",
            flush=True,
        )
    await trio.sleep(args.settle + TRIM_INTERVAL)
    end = rss_kib(target.pid)
    print(
        f"  {target.name} RSS {start / 1024:.1f} -> {end / 1024:.1f} MB "
        f"(x{end / start:.2f} of the start)",
        flush=True,
    )
    return {"start_kib": start, "end_kib": end, "per_conn_kib": per_conn}


def write_server_config(root: Path) -> Path:
    certs = root / "certs"
    create_ca(certs)
    issue_host_cert(certs, certs, SERVER_NAME, ip_addresses=[SERVER_HOST])
    issue_host_cert(certs, certs, PRIMARY_NAME)
    path = root / "server.toml"
    path.write_text(
        f"""
[server]
name = "{SERVER_NAME}"
listen = "{SERVER_HOST}"
port = 0

[tls]
cert = "certs/{SERVER_NAME}.pem"
key = "certs/{SERVER_NAME}-key.pem"
ca = "certs/ca.pem"

[[authorization]]
primary = "*.primary.example.com"
storage = "replicas"
trust_group = "site-a"

[connections]
{CONNECTIONS}
"""
    )
    return path


def run_server(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = write_server_config(root)
    server = start_server_process(config, root)
    try:
        certs = root / "certs"
        ctx = client_context(
            certs / f"{PRIMARY_NAME}.pem", certs / f"{PRIMARY_NAME}-key.pem", certs / "ca.pem"
        )
        target = Target("server", server.proc.pid, SERVER_HOST, server.port, SERVER_NAME, ctx)
        return trio.run(measure, target, args)
    finally:
        server.stop()


def run_broker(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    site = ClusterSite(root, nodes=1, connections=CONNECTIONS)
    site.start_all()
    try:
        node = site.broker_node(timeout=30)
        site.authorize_primary()
        target = Target(
            "broker", node.proc.pid, CAP_ADDRESS, site.cap_port, CAP_NAME, site.primary_context()
        )
        return trio.run(measure, target, args)
    finally:
        site.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--hold", type=int, default=500)
    parser.add_argument("--mid-body", type=int, default=40)
    parser.add_argument("--targets", default="server,broker")
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--tmp", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    runners = {"server": run_server, "broker": run_broker}
    for name in args.targets.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-conn-{name}-", dir=args.tmp))
        try:
            print(f"{name}: pid RSS per connection (KiB), by state", flush=True)
            results[name] = runners[name](root, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    worst = max(r["per_conn_kib"][s] for r in results.values() for s in IDLE_STATES)
    start = max(r["start_kib"] for r in results.values())
    ratios = {n: r["end_kib"] / r["start_kib"] for n, r in results.items()}
    worst_ratio_of = max(ratios, key=lambda n: ratios[n])
    print(
        json.dumps(
            {
                "name": "connections",
                "value": round(max(worst, 0.1), 1),
                "unit": "KiB per idle connection",
                "baseline": "RSS at start (ratio: RSS after all closes / at start, worst)",
                "baseline_value": round(start / 1024, 1),
                "ratio": round(ratios[worst_ratio_of], 3),
                "results": results,
                "pid": os.getpid(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

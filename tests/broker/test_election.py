"""The broker election and its fencing, against SQLite and a real etcd."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from broker.election import Deposed, Election, Term, current_holder, fenced_txn
from broker.records import ElectionRecord, Keys
from broker.store import ClusterStore, Compare, Put

REPO = Path(__file__).resolve().parents[2]
TTL = 1.0


def record(name: str) -> ElectionRecord:
    return ElectionRecord(
        holder=name, cap_name="cap.example.com", cap_address="127.0.0.9", cap_port=1
    )


async def test_one_leader_at_a_time_and_handover_on_release(
    store: ClusterStore, keys: Keys
) -> None:
    leading: list[str] = []
    overlap = False
    release = {"n1": trio.Event(), "n2": trio.Event()}
    terms: dict[str, Term] = {}

    def lead_as(name: str):  # type: ignore[no-untyped-def]
        async def lead(term: Term) -> None:
            nonlocal overlap
            if leading:
                overlap = True
            leading.append(name)
            terms[name] = term
            try:
                await release[name].wait()
            finally:
                leading.remove(name)

        return lead

    async with trio.open_nursery() as nursery:
        for name in ("n1", "n2"):
            nursery.start_soon(Election(store, keys, record(name), ttl=TTL).run, lead_as(name))
        with trio.fail_after(5):
            while not leading:
                await trio.sleep(0.02)
        first = leading[0]
        other = "n2" if first == "n1" else "n1"
        holder = await current_holder(store, keys)
        assert holder is not None
        assert holder.holder == first
        release[first].set()  # the first leader steps down: the other takes over
        with trio.fail_after(5):
            while leading != [other]:
                await trio.sleep(0.02)
        assert terms[other].token > terms[first].token
        nursery.cancel_scope.cancel()
    assert not overlap


async def test_a_deposed_broker_cannot_write(store: ClusterStore, keys: Keys) -> None:
    got: list[Term] = []

    async def lead(term: Term) -> None:
        got.append(term)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(Election(store, keys, record("n1"), ttl=TTL).run, lead)
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.02)
        old = got[0]
        ok = await fenced_txn(store, keys, old, [], [Put(keys.prefix + "x", b"1")])
        assert ok.succeeded
        # The term ends behind the leader's back (its lease expired while it was paused,
        # say) and another node is elected.
        await store.revoke(old.lease)
        b: list[Term] = []

        async def lead_b(term: Term) -> None:
            b.append(term)
            await trio.sleep_forever()

        nursery.start_soon(Election(store, keys, record("n2"), ttl=TTL).run, lead_b)
        with trio.fail_after(5):
            while not b or (got and len(got) > 1):
                await trio.sleep(0.02)
        with pytest.raises(Deposed):
            await fenced_txn(store, keys, old, [], [Put(keys.prefix + "x", b"stale")])
        kv = await store.get(keys.prefix + "x")
        assert kv is not None
        assert kv.value == b"1"
        # The new broker's fenced writes go through; its own compares still apply.
        new = b[-1]
        res = await fenced_txn(store, keys, new, [], [Put(keys.prefix + "x", b"2")])
        assert res.succeeded
        res = await fenced_txn(
            store,
            keys,
            new,
            [Compare.value(keys.prefix + "x", "==", b"nope")],
            [Put(keys.prefix + "x", b"3")],
        )
        assert not res.succeeded
        kv = await store.get(keys.prefix + "x")
        assert kv is not None
        assert kv.value == b"2"
        nursery.cancel_scope.cancel()


def test_a_killed_broker_is_replaced_within_its_ttl(store_url: str, keys: Keys) -> None:
    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.broker.candidate",
                store_url,
                keys.prefix,
                name,
                str(TTL),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )

    first = start("n1")
    second: subprocess.Popen[str] | None = None
    try:
        assert first.stdout is not None
        line = first.stdout.readline()
        assert line.startswith("elected"), line
        second = start("n2")
        time.sleep(0.5)  # n2 is campaigning, n1 holds the term
        first.kill()
        killed = time.monotonic()
        assert second.stdout is not None
        line = second.stdout.readline()
        took = time.monotonic() - killed
        assert line.startswith("elected"), line
        assert int(line.split()[1]) > 0
        print(f"broker re-elected {took:.2f} s after kill -9 (ttl {TTL} s)")
        assert took < TTL + 2.0
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)

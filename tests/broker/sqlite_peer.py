"""The second process of the cross-process SQLite test (``python -m tests.broker.sqlite_peer``).

It opens the same database file as the test, reads what the test wrote, contends with it on a
CAS counter, leaves a key on a lease it never keeps alive (so it expires after this process
exits), then answers the test's ``ping`` (seen through a watch) with a ``pong``.
"""

from __future__ import annotations

import sys

import trio

from broker.store import ClusterStore, Compare, EventKind, Put, open_store

CAS_ROUNDS = 50


async def cas_increment(store: ClusterStore, key: str) -> int:
    """Increment the integer at ``key`` with a mod_revision CAS, retrying on conflict; returns
    the number of conflicts met."""
    conflicts = 0
    while True:
        kv = await store.get(key)
        value = int(kv.value) if kv else 0
        rev = kv.mod_revision if kv else 0
        result = await store.txn(
            [Compare.mod_revision(key, "==", rev)], [Put(key, str(value + 1).encode())], []
        )
        if result.succeeded:
            return conflicts
        conflicts += 1


async def main(db: str, prefix: str) -> None:
    async with open_store(f"sqlite://{db}") as store:
        hello = await store.get(prefix + "hello")
        if hello is None or hello.value != b"from-parent":
            raise SystemExit(f"peer: did not see the parent's write: {hello}")
        async with store.watch(prefix + "ping", start_revision=hello.mod_revision) as events:
            lease = await store.grant_lease(1.0)
            await store.put(prefix + "ephemeral", b"peer", lease=lease)
            for _ in range(CAS_ROUNDS):
                await cas_increment(store, prefix + "counter")
            await store.put(prefix + "peer-ready", b"1")
            with trio.fail_after(20):
                async for event in events:
                    if event.kind is EventKind.PUT:
                        await store.put(prefix + "pong", event.kv.value + b"!")
                        break


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])

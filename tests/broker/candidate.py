"""A broker candidate in a process of its own, for tests that kill it: campaigns, prints
``elected <token>`` when it wins, then holds the term until it is killed.

    python -m tests.broker.candidate STORE_URL KEY_PREFIX NAME TTL
"""

from __future__ import annotations

import sys

import trio

from broker.election import Election, Term
from broker.records import ElectionRecord, Keys
from broker.store import open_store


async def main(url: str, prefix: str, name: str, ttl: float) -> None:
    record = ElectionRecord(
        holder=name, cap_name="cap.example.com", cap_address="127.0.0.9", cap_port=1
    )

    async def lead(term: Term) -> None:
        print(f"elected {term.token}", flush=True)
        await trio.sleep_forever()

    async with open_store(url) as store:
        await Election(store, Keys(prefix), record, ttl=ttl).run(lead)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))

"""Placement rules are loaded once per revision of the settings, not on every placement.

Loading reads the installed entry points' metadata and instantiates every rule, which
costs more than the placement itself; the broker places on every new VM's query. The
test rule below counts its instances, wherever the loading happens.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import frproto as fp
from broker import admin
from broker.election import Election, Term
from broker.placement import (
    PlacementContext,
    PlacementError,
    PlacementRequest,
    PlacementRule,
    RuleCache,
)
from broker.records import ElectionRecord, Keys, NodeRecord, NodeView
from broker.service import Broker
from broker.store import ClusterStore
from frlink.authz import Grant
from frlink.identity import PrimaryIdentity


class CountingRule:
    """A rule that accepts every node and counts how many times it was made."""

    name = "counting"
    made = 0

    def __init__(self) -> None:
        CountingRule.made += 1

    def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
        return True

    def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
        return 0.0


#: The settings' name of the rule (``module:attribute``).
RULE = f"{__name__}:CountingRule"
QUERIES = 25


async def _term(store: ClusterStore, keys: Keys, nursery: trio.Nursery) -> Term:
    got: list[Term] = []

    async def lead(term: Term) -> None:
        got.append(term)
        await trio.sleep_forever()

    record = ElectionRecord("n1.example.com", "cap.example.com", "127.0.0.10", 1)
    nursery.start_soon(Election(store, keys, record, ttl=2.0).run, lead)
    with trio.fail_after(5):
        while not got:
            await trio.sleep(0.01)
    return got[0]


async def _place_new_vms(broker: Broker, grant: Grant) -> None:
    for _ in range(QUERIES):
        query = fp.QueryRecoveryServer(uuid.uuid4(), "vm", (1 << 20,))
        answer = await broker.locate(query, grant)
        assert answer.existing is fp.ExistingVM.NEW


async def test_the_broker_loads_the_rules_once_per_settings_revision(
    store: ClusterStore, keys: Keys
) -> None:
    CountingRule.made = 0
    for i in range(1, 4):
        node = NodeRecord(f"n{i}.example.com", f"127.0.0.{10 + i}", 7000)
        await store.put(keys.node(node.name), node.to_json())
    await admin.update_settings(store, keys, {"placement_rules": [RULE]})
    assert CountingRule.made == 1  # the administrator's check loads them once, here
    grant = Grant(PrimaryIdentity("p.primary.example.com", "tg"), Path("replicas"))
    async with trio.open_nursery() as nursery:
        term = await _term(store, keys, nursery)
        broker = Broker(store, keys, term, term.record, ssl.create_default_context())
        await nursery.start(broker.cache.run)

        await _place_new_vms(broker, grant)
        view = broker.cache.view()
        for vm in list(view.vms.values())[:QUERIES]:  # tracking's moves place too
            broker.choose_node(view, vm, exclude=[vm.owner])
        assert CountingRule.made == 2  # the broker's one load for this revision

        changed = await admin.update_settings(store, keys, {"recovery_points": 5})
        assert CountingRule.made == 3  # the administrator's check again
        await broker.cache.wait_for(changed.revision, timeout=5)
        await _place_new_vms(broker, grant)
        assert CountingRule.made == 4  # a new revision: loaded once more, once
        nursery.cancel_scope.cancel()


def test_the_cache_keeps_a_load_and_its_failure_until_the_revision_changes() -> None:
    loads: list[tuple[str, ...]] = []

    def load(names: Sequence[str]) -> list[PlacementRule]:
        loads.append(tuple(names))
        if "broken" in names:
            raise PlacementError("placement rule 'broken': cannot import it")
        return [CountingRule()]

    cache = RuleCache(load)
    first = cache.rules(7, ["a"])
    assert all(cache.rules(7, ["a"]) is first for _ in range(100))
    assert loads == [("a",)]
    cache.rules(8, ["a"])
    assert loads == [("a",), ("a",)]
    for _ in range(100):
        with pytest.raises(PlacementError, match="cannot import it"):
            cache.rules(9, ["broken"])
    assert loads == [("a",), ("a",), ("broken",)]
    cache.rules(10, [])  # the settings fixed: loaded again
    assert loads[-1] == ()

"""Placement policies, rules and rule loading (broker/placement.py, broker/rules/)."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.placement import (
    NoCapacity,
    NodeLoad,
    Placement,
    PlacementContext,
    PlacementError,
    PlacementRequest,
    PlacementRule,
    entry_point_rules,
    load_rules,
    place,
)
from broker.records import (
    PLACEMENT_POLICIES,
    NodeAdmin,
    NodeRecord,
    NodeState,
    NodeView,
    PlacementCursor,
    VMRecord,
)
from broker.rules import SkipMaintenance, SpreadTrustGroup

GiB = 1 << 30
NAMES = ("r1.example.com", "r2.example.com", "r3.example.com", "r4.example.com")


def node(
    name: str,
    *,
    state: NodeState = NodeState.UP,
    capacity: int = 0,
    used: int = 0,
    labels: dict[str, str] | None = None,
) -> NodeView:
    return NodeView(
        record=NodeRecord(
            name=name, address="10.0.0.1", port=4433, capacity_bytes=capacity, used_bytes=used
        ),
        admin=NodeAdmin(draining=state is NodeState.DRAINING, labels=labels or {}),
        state=state,
    )


def vm(owner: str, size: int = GiB, *, trust_group: str = "", deleted: bool = False) -> VMRecord:
    return VMRecord(
        vmid=str(uuid.uuid4()),
        owner=owner,
        storage="/replicas",
        trust_group=trust_group,
        size_bytes=size,
        deleted=deleted,
    )


def request(size: int = GiB, trust_group: str = "", vmid: str | None = None) -> PlacementRequest:
    return PlacementRequest(
        vmid=vmid or str(uuid.uuid4()), size_bytes=size, trust_group=trust_group, primary="p1"
    )


def ctx(
    nodes: Sequence[NodeView],
    vms: Sequence[VMRecord] = (),
    cursor: PlacementCursor | None = None,
) -> PlacementContext:
    return PlacementContext(nodes=nodes, vms=vms, cursor=cursor or PlacementCursor())


def place_many(
    count: int,
    nodes: Sequence[NodeView],
    *,
    policy: str,
    vms: Iterable[VMRecord] = (),
    cursor: PlacementCursor | None = None,
    rules: Sequence[PlacementRule] = (),
    rng: random.Random | None = None,
    size: int = GiB,
    trust_group: str = "",
) -> tuple[list[str], list[VMRecord], PlacementCursor]:
    """Place ``count`` VMs one by one, feeding each placement back as the broker would
    (a new VM record and the stored cursor). Returns the chosen nodes, all VM records and
    the last cursor."""
    rng = rng or random.Random(0)
    records = list(vms)
    cur = cursor or PlacementCursor()
    chosen: list[str] = []
    for _ in range(count):
        req = request(size, trust_group)
        p = place(req, ctx(nodes, records, cur), policy=policy, rules=rules, rng=rng)
        chosen.append(p.node)
        records.append(
            VMRecord(
                vmid=req.vmid,
                owner=p.node,
                storage="/replicas",
                trust_group=req.trust_group,
                size_bytes=req.size_bytes,
            )
        )
        cur = p.cursor
    return chosen, records, cur


FOUR = [node(n) for n in NAMES]


# ----------------------------------------------------------------------------- round-robin


def test_round_robin_cyclic_25_each() -> None:
    chosen, _, cursor = place_many(100, FOUR, policy="round-robin")
    assert Counter(chosen) == dict.fromkeys(NAMES, 25)
    assert chosen == [NAMES[i % 4] for i in range(100)]
    assert cursor == PlacementCursor(last_node=NAMES[3], placed=100)


def test_round_robin_order_does_not_depend_on_node_order() -> None:
    chosen, _, _ = place_many(8, list(reversed(FOUR)), policy="round-robin")
    assert chosen == [NAMES[i % 4] for i in range(8)]


def test_round_robin_continues_after_restart() -> None:
    first, vms, cursor = place_many(50, FOUR, policy="round-robin")
    # A broker restart (or move): only what the store holds survives.
    stored = PlacementCursor.from_json(cursor.to_json())
    second, _, final = place_many(50, FOUR, policy="round-robin", vms=vms, cursor=stored)
    assert first + second == [NAMES[i % 4] for i in range(100)]
    assert second[0] == NAMES[50 % 4]
    assert final.placed == 100


def test_round_robin_cursor_survives_node_leaving() -> None:
    # The cursor names r2, which has left: the next name after it is still r3.
    nodes = [node(NAMES[0]), node(NAMES[2]), node(NAMES[3])]
    chosen, _, _ = place_many(
        4, nodes, policy="round-robin", cursor=PlacementCursor(last_node=NAMES[1], placed=7)
    )
    assert chosen == [NAMES[2], NAMES[3], NAMES[0], NAMES[2]]


def test_round_robin_cursor_survives_node_joining() -> None:
    joined = node("r2a.example.com")  # sorts between r2 and r3
    cursor = PlacementCursor(last_node=NAMES[1], placed=2)
    chosen, _, _ = place_many(3, [*FOUR, joined], policy="round-robin", cursor=cursor)
    assert chosen == ["r2a.example.com", NAMES[2], NAMES[3]]


def test_round_robin_wraps_after_last_name() -> None:
    p = place(
        request(),
        ctx(FOUR, cursor=PlacementCursor(last_node="zz.example.com")),
        policy="round-robin",
        rng=random.Random(0),
    )
    assert p.node == NAMES[0]
    assert "wraps" in p.reason


# ---------------------------------------------------------------------------------- random


def test_random_uses_all_nodes_roughly_uniformly() -> None:
    chosen, _, cursor = place_many(100, FOUR, policy="random", rng=random.Random(1234))
    counts = Counter(chosen)
    assert set(counts) == set(NAMES)
    # Expected 25 each; 10..40 is far outside any plausible deviation (sd ~4.3).
    assert all(10 <= c <= 40 for c in counts.values()), counts
    assert cursor == PlacementCursor(last_node=chosen[-1], placed=100)


def test_random_is_reproducible_from_seed() -> None:
    a, _, _ = place_many(20, FOUR, policy="random", rng=random.Random(7))
    b, _, _ = place_many(20, list(reversed(FOUR)), policy="random", rng=random.Random(7))
    assert a == b


# ---------------------------------------------------------------------------- least-loaded


def test_least_loaded_stays_balanced_at_every_step() -> None:
    vms: list[VMRecord] = []
    cursor = PlacementCursor()
    rng = random.Random(3)
    for _ in range(100):
        _, vms, cursor = place_many(
            1, FOUR, policy="least-loaded", vms=vms, cursor=cursor, size=rng.randint(1, 9) * GiB
        )
        counts = Counter(v.owner for v in vms)
        per_node = [counts.get(n, 0) for n in NAMES]
        assert max(per_node) - min(per_node) <= 1, per_node
    assert Counter(v.owner for v in vms) == dict.fromkeys(NAMES, 25)


def test_least_loaded_prefers_fewer_bytes_when_counts_tie() -> None:
    vms = [vm(NAMES[0], 5 * GiB), vm(NAMES[1], 2 * GiB), vm(NAMES[2], 9 * GiB), vm(NAMES[3], GiB)]
    p = place(request(), ctx(FOUR, vms), policy="least-loaded", rng=random.Random(0))
    assert p.node == NAMES[3]


def test_least_loaded_counts_vms_before_bytes_and_ignores_deleted() -> None:
    vms = [
        vm(NAMES[0], 100 * GiB),  # one big VM
        vm(NAMES[1], GiB),
        vm(NAMES[1], GiB),  # two small ones
        vm(NAMES[2], GiB),
        vm(NAMES[2], GiB),
        vm(NAMES[3], GiB),
        vm(NAMES[3], GiB),
        vm(NAMES[1], 500 * GiB, deleted=True),
    ]
    p = place(request(), ctx(FOUR, vms), policy="least-loaded", rng=random.Random(0))
    assert p.node == NAMES[0]


# -------------------------------------------------------------------------- capacity-aware


def test_capacity_aware_never_picks_a_full_node_then_no_capacity() -> None:
    nodes = [
        node(NAMES[0], capacity=10 * GiB),
        node(NAMES[1], capacity=25 * GiB),
        node(NAMES[2], capacity=3 * GiB, used=2 * GiB),  # reported usage counts too
        node(NAMES[3], capacity=7 * GiB),
    ]
    vms: list[VMRecord] = []
    cursor = PlacementCursor()
    # 5 + 12 + 0 + 3 VMs of 2 GiB fit (r3 has 1 GiB left after its reported usage).
    for _ in range(20):
        c = ctx(nodes, vms, cursor)
        before = {n.name: c.load(n.name).free_bytes for n in nodes}
        chosen, vms, cursor = place_many(
            1, nodes, policy="capacity-aware", vms=vms, cursor=cursor, size=2 * GiB
        )
        assert before[chosen[0]] >= 2 * GiB
        assert before[chosen[0]] == max(before.values())  # most free room wins
    # Then every node is full and says so.
    with pytest.raises(NoCapacity) as err:
        place(
            request(2 * GiB), ctx(nodes, vms, cursor), policy="capacity-aware", rng=random.Random()
        )
    for n in NAMES:
        assert n in str(err.value)
        assert err.value.exclusions[n].startswith("no room")
    counts = Counter(v.owner for v in vms)
    assert counts == {NAMES[0]: 5, NAMES[1]: 12, NAMES[3]: 3}


def test_capacity_aware_unknown_capacity_is_unlimited_and_spreads() -> None:
    chosen, _, _ = place_many(8, FOUR, policy="capacity-aware")
    assert Counter(chosen) == dict.fromkeys(NAMES, 2)


def test_deleted_vms_free_their_room() -> None:
    nodes = [node(NAMES[0], capacity=2 * GiB)]
    with pytest.raises(NoCapacity):
        place(request(), ctx(nodes, [vm(NAMES[0], 2 * GiB)]), policy="random", rng=random.Random())
    p = place(
        request(),
        ctx(nodes, [vm(NAMES[0], 2 * GiB, deleted=True)]),
        policy="random",
        rng=random.Random(),
    )
    assert p.node == NAMES[0]


def test_load_takes_the_larger_of_report_and_records() -> None:
    c = ctx(
        [node(NAMES[0], capacity=10, used=4), node(NAMES[1], capacity=10, used=1)],
        [vm(NAMES[0], 3), vm(NAMES[1], 3), vm(NAMES[1], 50, deleted=True)],
    )
    assert c.load(NAMES[0]) == NodeLoad(vms=1, used_bytes=4, capacity_bytes=10)
    assert c.load(NAMES[1]) == NodeLoad(vms=1, used_bytes=3, capacity_bytes=10)
    assert c.load(NAMES[1]).free_bytes == 7


# ------------------------------------------------------------------ states and NoCapacity


@pytest.mark.parametrize("policy", PLACEMENT_POLICIES)
def test_draining_and_down_nodes_never_chosen(policy: str) -> None:
    nodes = [
        node(NAMES[0], state=NodeState.DRAINING),
        node(NAMES[1]),
        node(NAMES[2], state=NodeState.DOWN),
        node(NAMES[3]),
    ]
    chosen, _, _ = place_many(40, nodes, policy=policy)
    assert set(chosen) == {NAMES[1], NAMES[3]}


def test_no_capacity_lists_every_reason() -> None:
    nodes = [
        node(NAMES[0], state=NodeState.DOWN),
        node(NAMES[1], state=NodeState.DRAINING),
        node(NAMES[2], capacity=GiB, used=GiB),
        node(NAMES[3], labels={"maintenance": "yes"}),
    ]
    with pytest.raises(NoCapacity) as err:
        place(
            request(),
            ctx(nodes),
            policy="round-robin",
            rules=[SkipMaintenance()],
            rng=random.Random(),
        )
    assert err.value.exclusions == {
        NAMES[0]: "down",
        NAMES[1]: "draining",
        NAMES[2]: f"no room (0 free < {GiB} needed)",
        NAMES[3]: "rule maintenance",
    }
    assert isinstance(err.value, PlacementError)
    for why in err.value.exclusions.values():
        assert why in str(err.value)


def test_no_nodes_at_all() -> None:
    with pytest.raises(NoCapacity, match="no recovery nodes are known"):
        place(request(), ctx([]), policy="round-robin", rng=random.Random())


def test_unknown_policy() -> None:
    with pytest.raises(PlacementError, match="unknown placement policy"):
        place(request(), ctx(FOUR), policy="first-fit", rng=random.Random())


def test_reason_names_policy_and_node() -> None:
    p = place(request(), ctx(FOUR), policy="least-loaded", rng=random.Random())
    assert isinstance(p, Placement)
    assert p.reason.startswith(f"least-loaded: {p.node}")
    assert "4 of 4 nodes eligible" in p.reason


# ----------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("value", ["true", "yes", "1", "TRUE", " Yes "])
def test_skip_maintenance_excludes_labeled_nodes(value: str) -> None:
    nodes = [node(NAMES[0], labels={"maintenance": value}), *FOUR[1:]]
    chosen, _, _ = place_many(12, nodes, policy="round-robin", rules=[SkipMaintenance()])
    assert NAMES[0] not in chosen
    assert set(chosen) == set(NAMES[1:])


@pytest.mark.parametrize("value", ["false", "no", "0", "", "later"])
def test_skip_maintenance_other_values_are_off(value: str) -> None:
    nodes = [node(NAMES[0], labels={"maintenance": value})]
    p = place(
        request(), ctx(nodes), policy="random", rules=[SkipMaintenance()], rng=random.Random()
    )
    assert p.node == NAMES[0]


def test_spread_trust_group_spreads_a_group() -> None:
    # Other tenants fill r1 and r2 so that least-loaded alone would pile onto r3/r4;
    # the rule still spreads tenant "blue" over all four nodes.
    others = [vm(NAMES[0], trust_group="red") for _ in range(5)]
    others += [vm(NAMES[1], trust_group="red") for _ in range(5)]
    chosen, _, _ = place_many(
        8,
        FOUR,
        policy="least-loaded",
        vms=others,
        rules=[SpreadTrustGroup()],
        trust_group="blue",
    )
    assert Counter(chosen) == dict.fromkeys(NAMES, 2)


def test_spread_trust_group_scores() -> None:
    vms = [
        vm(NAMES[0], trust_group="blue"),
        vm(NAMES[0], trust_group="blue"),
        vm(NAMES[0], trust_group="red"),
        vm(NAMES[1], trust_group="blue", deleted=True),
    ]
    rule = SpreadTrustGroup()
    c = ctx(FOUR, vms)
    assert rule.score(request(trust_group="blue"), FOUR[0], c) == -2
    assert rule.score(request(trust_group="blue"), FOUR[1], c) == 0
    assert rule.score(request(trust_group="red"), FOUR[0], c) == -1
    assert rule.score(request(trust_group=""), FOUR[0], c) == 0
    assert rule.filter(request(), FOUR[0], c)


def test_scores_keep_only_the_best_then_policy_chooses() -> None:
    @dataclass
    class Prefer:
        wanted: frozenset[str]
        name: str = "prefer"

        def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
            return True

        def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
            return 1.0 if node.name in self.wanted else 0.0

    rule = Prefer(frozenset({NAMES[1], NAMES[3]}))
    chosen, _, _ = place_many(6, FOUR, policy="round-robin", rules=[rule])
    assert chosen == [NAMES[1], NAMES[3]] * 3


def test_rule_that_raises_is_a_placement_error() -> None:
    class Broken:
        name = "broken"

        def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
            raise KeyError("oops")

        def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
            return 0.0

    with pytest.raises(PlacementError, match="rule broken failed on node"):
        place(request(), ctx(FOUR), policy="random", rules=[Broken()], rng=random.Random())


# ---------------------------------------------------------------------------- rule loading


class PathRule:
    """A rule defined in this test module, loaded by import path."""

    name = "path-rule"

    def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
        return node.name != NAMES[0]

    def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
        return 0.0


PATH_RULE_INSTANCE = PathRule()


def path_rule_factory() -> PathRule:
    return PathRule()


NOT_A_RULE = object()


def test_load_rules_by_path() -> None:
    rules = load_rules(
        [
            "broker.rules.maintenance:SkipMaintenance",
            f"{__name__}:PathRule",
            f"{__name__}:PATH_RULE_INSTANCE",
            f"{__name__}:path_rule_factory",
        ]
    )
    assert isinstance(rules[0], SkipMaintenance)
    assert all(isinstance(r, PathRule) for r in rules[1:])
    assert rules[2] is PATH_RULE_INSTANCE
    chosen, _, _ = place_many(6, FOUR, policy="round-robin", rules=rules)
    assert NAMES[0] not in chosen


def test_load_rules_by_entry_point_name() -> None:
    rules = load_rules(["maintenance", "spread-trust-group"])
    assert isinstance(rules[0], SkipMaintenance)
    assert isinstance(rules[1], SpreadTrustGroup)
    assert [r.name for r in rules] == ["maintenance", "spread-trust-group"]


def test_entry_point_rules_lists_installed_rules() -> None:
    rules = entry_point_rules()
    assert isinstance(rules["maintenance"], SkipMaintenance)
    assert isinstance(rules["spread-trust-group"], SpreadTrustGroup)


def test_load_rules_empty_applies_nothing() -> None:
    assert load_rules([]) == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:Rule", "cannot import no_such_module_xyz"),
        ("broker.rules.maintenance:Nope", "has no attribute 'Nope'"),
        (f"{__name__}:NOT_A_RULE", "is not a rule"),
        ("broker.rules.maintenance:LABEL", "is not a rule"),
        (":Rule", "expected 'module:attribute'"),
        ("broker.rules.maintenance:", "expected 'module:attribute'"),
        ("no-such-entry-point", "no entry point of that name"),
    ],
)
def test_load_rules_bad_path(path: str, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        load_rules([path])


# --------------------------------------------------------------------------- property test

node_views = st.builds(
    lambda i, state, capacity, used, maint: node(
        f"n{i}.example.com",
        state=state,
        capacity=capacity,
        used=used,
        labels={"maintenance": "true"} if maint else {},
    ),
    st.integers(0, 20),
    st.sampled_from(list(NodeState)),
    st.sampled_from([0, 10, 100, 1000]),
    st.integers(0, 200),
    st.booleans(),
)


@given(
    nodes=st.lists(node_views, max_size=8, unique_by=lambda n: n.name),
    placed=st.lists(
        st.tuples(
            st.integers(0, 20), st.integers(0, 300), st.sampled_from(["", "a", "b"]), st.booleans()
        ),
        max_size=20,
    ),
    size=st.integers(0, 500),
    trust_group=st.sampled_from(["", "a", "b"]),
    policy=st.sampled_from(PLACEMENT_POLICIES),
    last_node=st.sampled_from(["", "n5.example.com", "zzz"]),
    with_rules=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_chosen_node_is_always_eligible(
    nodes: list[NodeView],
    placed: list[tuple[int, int, str, bool]],
    size: int,
    trust_group: str,
    policy: str,
    last_node: str,
    with_rules: bool,
    seed: int,
) -> None:
    vms = [vm(f"n{i}.example.com", s, trust_group=g, deleted=d) for i, s, g, d in placed]
    c = ctx(nodes, vms, PlacementCursor(last_node=last_node, placed=3))
    rules: list[PlacementRule] = [SkipMaintenance(), SpreadTrustGroup()] if with_rules else []
    req = request(size, trust_group)

    def eligible(n: NodeView) -> bool:
        booked = sum(v.size_bytes for v in vms if v.owner == n.name and not v.deleted)
        used = max(n.record.used_bytes, booked)
        room = n.record.capacity_bytes == 0 or n.record.capacity_bytes - used >= size
        return (
            n.state is NodeState.UP
            and not n.admin.draining
            and room
            and all(r.filter(req, n, c) for r in rules)
        )

    if not any(eligible(n) for n in nodes):
        with pytest.raises(NoCapacity) as err:
            place(req, c, policy=policy, rules=rules, rng=random.Random(seed))
        assert set(err.value.exclusions) == {n.name for n in nodes}
        return
    p = place(req, c, policy=policy, rules=rules, rng=random.Random(seed))
    chosen = next(n for n in nodes if n.name == p.node)
    assert eligible(chosen)
    assert p.cursor == PlacementCursor(last_node=p.node, placed=4)

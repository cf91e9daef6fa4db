"""Placement: which recovery node gets a new replica VM (pure logic, no I/O).

The broker reads the node views, the VM records and the round-robin cursor from the
cluster store, calls :func:`place`, and writes the new VM record and the returned cursor
back in one compare-and-swap. Nothing here touches the store, the clock or the network,
so the same decision can be replayed from a seed in a simulation.

Steps of one placement:

1. **Candidates**: nodes whose state is :attr:`~broker.records.NodeState.UP` (not
   draining, not down) and that have room for the VM (see :class:`NodeLoad`).
2. **Rules**: every rule's :meth:`PlacementRule.filter` must accept the node.
3. **Scores**: if any rule gives a node a non-zero score, only the candidates with the
   highest total score stay.
4. **Policy** (the ``placement_policy`` setting) picks one of them:

   ``round-robin``
       the first candidate after the cursor's ``last_node`` in name order, wrapping. The
       cursor is a *name*, not an index, so a node joining or leaving does not shift it.
   ``random``
       uniform among the candidates, using the ``rng`` passed in.
   ``least-loaded``
       fewest non-deleted VMs, then fewest used bytes, then name.
   ``capacity-aware``
       most free room, then fewest used bytes, then name.

When no node is left, :class:`NoCapacity` says why each node was excluded.

Rules are loaded by :func:`load_rules` from the settings' ``placement_rules`` list:
either an import path ``module:attribute`` or the name of an entry point in the group
``frrep.placement_rules`` (see :func:`entry_point_rules`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final, Protocol, TypeGuard

from broker.records import (
    PLACEMENT_POLICIES,
    NodeState,
    NodeView,
    PlacementCursor,
    PlacementPolicy,
    VMRecord,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "NoCapacity",
    "NodeLoad",
    "Placement",
    "PlacementContext",
    "PlacementError",
    "PlacementRequest",
    "PlacementRule",
    "RuleCache",
    "entry_point_rules",
    "load_rules",
    "place",
]

#: The entry-point group where installed packages register placement rules.
ENTRY_POINT_GROUP: Final = "frrep.placement_rules"


class PlacementError(Exception):
    """Placement could not be done: a bad policy, a rule that cannot be loaded or that
    failed, or (as :class:`NoCapacity`) no node that can take the VM."""


class NoCapacity(PlacementError):
    """No recovery node can take the VM; the message says why each node was excluded."""

    def __init__(self, message: str, exclusions: dict[str, str]) -> None:
        super().__init__(message)
        #: ``{node name: why it was excluded}``, for callers that want more than the text.
        self.exclusions = exclusions


@dataclass(frozen=True)
class PlacementRequest:
    """A primary server asks where a new replica VM should live."""

    vmid: str
    size_bytes: int  #: the VM's disks, summed
    trust_group: str
    primary: str  #: the primary server's identity


@dataclass(frozen=True)
class NodeLoad:
    """What a node holds, as placement counts it.

    ``used_bytes`` is the larger of two figures for the same thing: what the node last
    reported in its record (:attr:`~broker.records.NodeRecord.used_bytes`) and the sum of
    ``size_bytes`` of the non-deleted VM records it owns. The node's report sees data no
    VM record describes yet; the records see placements made since the node last reported.
    Taking the larger never counts a replica twice (adding them would) and never places
    on a node that is fuller than one of the two figures says.

    ``capacity_bytes == 0`` means the node did not say: its room is unlimited.
    """

    vms: int
    used_bytes: int
    capacity_bytes: int

    @property
    def free_bytes(self) -> float:
        """Room left: ``math.inf`` when capacity is unknown; may be negative when full."""
        if self.capacity_bytes == 0:
            return math.inf
        return self.capacity_bytes - self.used_bytes

    def has_room(self, size_bytes: int) -> bool:
        """Whether a VM of ``size_bytes`` fits."""
        return self.free_bytes >= size_bytes


@dataclass(frozen=True)
class PlacementContext:
    """What placement sees of the cluster at one instant (read from the store)."""

    nodes: Sequence[NodeView]  #: every known node, in any state
    #: Every VM record, deleted ones included (they are ignored for load: their storage
    #: is gone, the record only remembers that the primary must stop).
    vms: Sequence[VMRecord]
    cursor: PlacementCursor
    #: Optional: ``{owner: (VM count, bytes)}`` of the non-deleted VMs, kept up to date by
    #: the caller (the broker's copy of the cluster), so that the loads need not be
    #: summed over every VM record at each placement.
    owned: Mapping[str, tuple[int, int]] | None = None

    # cached_property writes straight into __dict__, so it works on a frozen dataclass;
    # rules and policies ask for loads many times per placement and the VM list is big.
    @cached_property
    def loads(self) -> dict[str, NodeLoad]:
        """:class:`NodeLoad` of every node in :attr:`nodes`, by name."""
        counts: dict[str, int] = {}
        booked: dict[str, int] = {}
        if self.owned is not None:
            for owner, (count, size) in self.owned.items():
                counts[owner], booked[owner] = count, size
        else:
            for vm in self.vms:
                if vm.deleted:
                    continue
                counts[vm.owner] = counts.get(vm.owner, 0) + 1
                booked[vm.owner] = booked.get(vm.owner, 0) + vm.size_bytes
        return {
            n.name: NodeLoad(
                vms=counts.get(n.name, 0),
                used_bytes=max(n.record.used_bytes, booked.get(n.name, 0)),
                capacity_bytes=n.record.capacity_bytes,
            )
            for n in self.nodes
        }

    def load(self, node: str) -> NodeLoad:
        """The load of one node (an unknown name holds nothing and has unlimited room)."""
        return self.loads.get(node, NodeLoad(vms=0, used_bytes=0, capacity_bytes=0))


class PlacementRule(Protocol):
    """An extra placement rule (a plug-in). Either method may be a no-op.

    Rules only see nodes that are up and have room; they must be pure (no I/O, no
    clock), because placement is replayed deterministically in simulation. The broker
    keeps one instance for every placement until the settings change (:class:`RuleCache`).
    """

    #: Short name used in logs and in :class:`NoCapacity` messages.
    name: str

    def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
        """False: never place this request on this node."""
        ...

    def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
        """Preference for this node: higher is better, 0 is neutral. Scores of all rules
        are added; only the nodes with the highest total stay candidates."""
        ...


@dataclass(frozen=True)
class Placement:
    """The outcome of :func:`place`."""

    node: str  #: the chosen node's name (FQDN)
    cursor: PlacementCursor  #: the cursor to store with the VM record
    reason: str  #: a short explanation for the broker's log


def _rule_name(rule: object) -> str:
    # Plug-ins may forget the attribute; logs and errors still need something to show.
    name = getattr(rule, "name", None)
    return name if isinstance(name, str) and name else type(rule).__name__


def _exclusion(
    request: PlacementRequest,
    node: NodeView,
    ctx: PlacementContext,
    rules: Sequence[PlacementRule],
) -> str | None:
    """Why ``node`` cannot take ``request``, or None if it can."""
    if node.state is not NodeState.UP:
        return str(node.state)  # "down" or "draining"
    load = ctx.load(node.name)
    if not load.has_room(request.size_bytes):
        return f"no room ({max(0, int(load.free_bytes))} free < {request.size_bytes} needed)"
    for rule in rules:
        try:
            ok = rule.filter(request, node, ctx)
        except Exception as exc:
            raise PlacementError(
                f"placement rule {_rule_name(rule)} failed on node {node.name}: {exc!r}"
            ) from exc
        if not ok:
            return f"rule {_rule_name(rule)}"
    return None


def _total_score(
    request: PlacementRequest,
    node: NodeView,
    ctx: PlacementContext,
    rules: Sequence[PlacementRule],
) -> float:
    total = 0.0
    for rule in rules:
        try:
            total += float(rule.score(request, node, ctx))
        except Exception as exc:
            raise PlacementError(
                f"placement rule {_rule_name(rule)} failed to score node {node.name}: {exc!r}"
            ) from exc
    return total


def place(
    request: PlacementRequest,
    ctx: PlacementContext,
    *,
    policy: PlacementPolicy | str,
    rules: Sequence[PlacementRule] = (),
    rng: random.Random,
) -> Placement:
    """Choose the recovery node for a new replica VM (see the module docstring).

    ``policy`` is one of :data:`~broker.records.PLACEMENT_POLICIES`; ``rng`` is only used
    by ``random`` but is always required, so that a caller cannot forget to seed it.
    The returned cursor is ``last_node=chosen, placed=cursor.placed + 1`` whatever the
    policy, so that switching to round-robin later goes on from the last placement.

    Raises :class:`NoCapacity` when no node can take the VM, :class:`PlacementError` for
    an unknown policy or a rule that raised.
    """
    if policy not in PLACEMENT_POLICIES:
        raise PlacementError(f"unknown placement policy {policy!r}: one of {PLACEMENT_POLICIES}")

    # Sorted by name so that every step below is deterministic whatever the store's order.
    nodes = sorted(ctx.nodes, key=lambda n: n.name)
    excluded: dict[str, str] = {}
    candidates: list[NodeView] = []
    for node in nodes:
        why = _exclusion(request, node, ctx, rules)
        if why is None:
            candidates.append(node)
        else:
            excluded[node.name] = why
    if not candidates:
        if not nodes:
            detail = "no recovery nodes are known"
        else:
            detail = "; ".join(f"{name}: {why}" for name, why in excluded.items())
        raise NoCapacity(
            f"no recovery node can take VM {request.vmid} ({request.size_bytes} bytes): {detail}",
            excluded,
        )

    scored = ""
    if rules:
        scores = {n.name: _total_score(request, n, ctx, rules) for n in candidates}
        best = max(scores.values())
        kept = [n for n in candidates if scores[n.name] == best]
        if len(kept) < len(candidates):
            scored = f", best score {best:g} kept {len(kept)}"
        candidates = kept

    chosen, why = _POLICIES[PlacementPolicy(policy)](candidates, ctx, rng)
    pool = f"{len(candidates)} of {len(nodes)} nodes eligible{scored}"
    return Placement(
        node=chosen.name,
        cursor=PlacementCursor(last_node=chosen.name, placed=ctx.cursor.placed + 1),
        reason=f"{policy}: {chosen.name} {why} ({pool})",
    )


# Each policy gets the candidates (non-empty, sorted by name) and returns the chosen
# node with a few words for the log.
_Policy = Callable[[list[NodeView], PlacementContext, random.Random], tuple[NodeView, str]]


def _round_robin(
    candidates: list[NodeView], ctx: PlacementContext, rng: random.Random
) -> tuple[NodeView, str]:
    last = ctx.cursor.last_node
    # By name, not index: the cursor's node may have left (or never been a candidate)
    # and the next name after it is still the right one.
    for node in candidates:
        if node.name > last:
            return node, f"follows {last!r}" if last else "is first"
    return candidates[0], f"wraps around after {last!r}"


def _random(
    candidates: list[NodeView], ctx: PlacementContext, rng: random.Random
) -> tuple[NodeView, str]:
    return rng.choice(candidates), "drawn at random"


def _least_loaded(
    candidates: list[NodeView], ctx: PlacementContext, rng: random.Random
) -> tuple[NodeView, str]:
    def key(n: NodeView) -> tuple[int, int, str]:
        load = ctx.load(n.name)
        return (load.vms, load.used_bytes, n.name)

    node = min(candidates, key=key)
    load = ctx.load(node.name)
    return node, f"holds fewest VMs ({load.vms}, {load.used_bytes} bytes)"


def _capacity_aware(
    candidates: list[NodeView], ctx: PlacementContext, rng: random.Random
) -> tuple[NodeView, str]:
    # Fewest used bytes breaks ties before the name: nodes of unknown capacity all have
    # unlimited room, and the name alone would pile every VM onto the first of them.
    def key(n: NodeView) -> tuple[float, int, str]:
        load = ctx.load(n.name)
        return (-load.free_bytes, load.used_bytes, n.name)

    node = min(candidates, key=key)
    free = ctx.load(node.name).free_bytes
    return node, "has most free room (" + ("unlimited" if free == math.inf else f"{free:.0f}") + ")"


_POLICIES: Final[dict[PlacementPolicy, _Policy]] = {
    PlacementPolicy.ROUND_ROBIN: _round_robin,
    PlacementPolicy.RANDOM: _random,
    PlacementPolicy.LEAST_LOADED: _least_loaded,
    PlacementPolicy.CAPACITY_AWARE: _capacity_aware,
}
assert set(_POLICIES) == set(PlacementPolicy), "a policy in records.py is not built here"


# --------------------------------------------------------------------------- rule loading


def _as_rule(obj: object, what: str) -> PlacementRule:
    """Turn what a path or entry point names into a rule instance.

    A class is instantiated with no arguments; an object that already has ``filter`` and
    ``score`` is used as it is; any other callable is a factory and is called once.
    """
    if _is_rule(obj) and not isinstance(obj, type):
        return obj
    if callable(obj):
        try:
            made = obj()
        except Exception as exc:
            raise PlacementError(f"placement rule {what}: could not create it: {exc!r}") from exc
        if _is_rule(made):
            return made
        obj = made
    raise PlacementError(
        f"placement rule {what}: {obj!r} is not a rule (needs filter() and score() methods)"
    )


def _is_rule(obj: object) -> TypeGuard[PlacementRule]:
    # Checked by hand rather than with a runtime_checkable Protocol: that would demand
    # the ``name`` attribute too, and a missing name is harmless (see _rule_name).
    return callable(getattr(obj, "filter", None)) and callable(getattr(obj, "score", None))


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> PlacementRule:
    what = f"{ep.name!r} (entry point {ep.value})"
    try:
        obj = ep.load()
    except Exception as exc:
        raise PlacementError(f"placement rule {what}: cannot load it: {exc!r}") from exc
    return _as_rule(obj, what)


def _load_path(path: str) -> PlacementRule:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise PlacementError(f"placement rule {path!r}: expected 'module:attribute'")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises on import
        raise PlacementError(
            f"placement rule {path!r}: cannot import {module_name}: {exc!r}"
        ) from exc
    # Dotted attributes ("module:Class.factory") are allowed, as in entry points.
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PlacementError(
                f"placement rule {path!r}: {module_name} has no attribute {attribute!r}"
            ) from None
    return _as_rule(obj, repr(path))


def load_rules(paths: Sequence[str]) -> list[PlacementRule]:
    """Load the rules the settings' ``placement_rules`` list names, in order.

    Each entry is an import path ``module:attribute`` (a class, instantiated with no
    arguments, a rule instance, or a factory called with no arguments), or the bare name
    of an entry point in :data:`ENTRY_POINT_GROUP` (e.g. ``"maintenance"``). Installed
    entry points are *not* applied unless named here.

    Raises :class:`PlacementError` naming the entry that cannot be loaded.
    """
    rules: list[PlacementRule] = []
    eps: dict[str, importlib.metadata.EntryPoint] | None = None
    for path in paths:
        if ":" in path:
            rules.append(_load_path(path))
            continue
        if eps is None:  # read the installed metadata once, and only if needed
            eps = _entry_points()
        ep = eps.get(path)
        if ep is None:
            known = ", ".join(sorted(eps)) or "none installed"
            raise PlacementError(
                f"placement rule {path!r}: not 'module:attribute' and no entry point of "
                f"that name in {ENTRY_POINT_GROUP} ({known})"
            )
        rules.append(_load_entry_point(ep))
    return rules


def entry_point_rules() -> dict[str, PlacementRule]:
    """Every rule registered in the entry-point group :data:`ENTRY_POINT_GROUP`, loaded,
    by entry-point name (sorted). For listing what can be named in the settings; the
    broker applies only the rules the settings select (:func:`load_rules`)."""
    return {name: _load_entry_point(ep) for name, ep in sorted(_entry_points().items())}


class RuleCache:
    """:func:`load_rules`, once per revision of the settings.

    Loading reads the installed entry points' metadata and instantiates every rule: far
    more than a placement itself costs, and the broker places on every new VM's query.
    The settings record's ``mod_revision`` says when the list may have changed; a failure
    to load is kept too (and raised again) until the settings change, so a bad rule name
    does not cost a metadata scan per query either.

    Args:
        load: the loader (tests count its calls).
    """

    def __init__(self, load: Callable[[Sequence[str]], list[PlacementRule]] = load_rules) -> None:
        self._load = load
        self._key: tuple[int, tuple[str, ...]] | None = None
        self._rules: list[PlacementRule] = []
        self._error: str | None = None

    def rules(self, settings_revision: int, names: Sequence[str]) -> list[PlacementRule]:
        """The rules ``names`` (the settings' ``placement_rules`` at ``settings_revision``).

        Raises :class:`PlacementError` as :func:`load_rules` does.
        """
        # The names are part of the key only as a guard: at one revision they are the same.
        key = (settings_revision, tuple(names))
        if key != self._key:
            try:
                self._rules, self._error = self._load(names), None
            except PlacementError as exc:
                self._rules, self._error = [], str(exc)
            self._key = key
        if self._error is not None:
            raise PlacementError(self._error)
        return self._rules

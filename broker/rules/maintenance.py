"""Rule ``maintenance``: keep new replicas off nodes an administrator marked for maintenance.

Draining a node (:attr:`broker.records.NodeAdmin.draining`) already stops placement on
it, but draining is for moving replicas *away*. The ``maintenance`` label is lighter:
the node keeps its replicas and keeps replicating, it only takes nothing new, e.g.
before a planned reboot or while its storage is being extended. Set it as a node admin label::

    /frrep/node-admin/<node>  {"labels": {"maintenance": "true"}}

``"true"``, ``"yes"`` and ``"1"`` (any case, surrounding blanks ignored) mean on; any
other value, or no label, means off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from broker.placement import PlacementContext, PlacementRequest
    from broker.records import NodeView

#: The admin label this rule reads.
LABEL: Final = "maintenance"
_ON: Final = frozenset({"true", "yes", "1"})


class SkipMaintenance:
    """Filters out nodes whose admin label ``maintenance`` is ``true``/``yes``/``1``."""

    name = "maintenance"

    def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
        """False for a node under maintenance."""
        return node.admin.labels.get(LABEL, "").strip().lower() not in _ON

    def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
        """Neutral: this rule only filters."""
        return 0.0

"""Rule ``spread-trust-group``: spread the VMs of one trust group over the nodes.

A trust group is a set of primary servers an administrator treats as one tenant (see the
authorization entries in the settings). Keeping its replicas apart means losing one
recovery node loses as few of that tenant's replicas as possible, and one tenant's
replication load does not pile onto one node.

The score of a node is minus the number of non-deleted VMs of the request's trust group
it holds, so :func:`broker.placement.place` keeps only the nodes holding the fewest; the
policy then chooses among them. A request without a trust group (``""``) is neutral
everywhere: VMs with no group are not one tenant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.placement import PlacementContext, PlacementRequest
    from broker.records import NodeView


class SpreadTrustGroup:
    """Scores nodes by ``-(VMs of the same trust group on the node)``; never filters."""

    name = "spread-trust-group"

    def filter(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> bool:
        """Every node may take the VM: spreading is a preference, not a limit."""
        return True

    def score(self, request: PlacementRequest, node: NodeView, ctx: PlacementContext) -> float:
        """Minus how many non-deleted VMs of ``request.trust_group`` the node holds."""
        if not request.trust_group:
            return 0.0
        return -float(
            sum(
                1
                for vm in ctx.vms
                if not vm.deleted
                and vm.owner == node.name
                and vm.trust_group == request.trust_group
            )
        )

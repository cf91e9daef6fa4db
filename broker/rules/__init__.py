"""Placement rules shipped with frrep (plug-ins for :mod:`broker.placement`).

Each rule is registered as an entry point in the group ``frrep.placement_rules`` and is
applied only when the settings' ``placement_rules`` list names it:

``maintenance`` (:class:`~broker.rules.maintenance.SkipMaintenance`)
    never place on a node labeled ``maintenance=true``.
``spread-trust-group`` (:class:`~broker.rules.spread.SpreadTrustGroup`)
    prefer nodes holding fewer VMs of the request's trust group.

A rule of your own is any object with a ``name`` and the ``filter`` / ``score`` methods
of :class:`broker.placement.PlacementRule`; name it in the settings as
``module:attribute`` or register it under the same entry-point group.
"""

from __future__ import annotations

from broker.rules.maintenance import SkipMaintenance
from broker.rules.spread import SpreadTrustGroup

__all__ = ["SkipMaintenance", "SpreadTrustGroup"]

"""The cluster's authorization entries (a setting) as the nodes and the broker use them.

In ``Settings.authorization`` each entry is a table like a recovery server's
``[[authorization]]``::

    {"primary": "*.hv.example.com", "storage": "replicas", "trust_group": "hv"}
    {"primary": "*", "storage": "any", "trust_group": "open"}   # any authenticated primary

``storage`` is relative to the node's storage root (or absolute, for a path every node
sees); without it the ``default_storage`` setting applies. ``"*"`` is the explicit "any
authenticated primary" option.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from frlink.authz import Authorization, AuthorizationEntry

from .records import RecordError


def authorization_from_settings(
    entries: Sequence[dict[str, Any]], root: Path, default_storage: str = ""
) -> Authorization:
    """Build the :class:`Authorization` of a node whose storage root is ``root``. An
    entry without ``storage`` uses ``default_storage`` (the setting of that name).

    Raises:
        RecordError: an entry is malformed (named by its position).
    """
    normal: list[AuthorizationEntry] = []
    any_primary: AuthorizationEntry | None = None
    for i, item in enumerate(entries):
        where = f"authorization entry #{i + 1}"
        try:
            primary = item["primary"]
            storage = item.get("storage") or default_storage
            group = item["trust_group"]
        except KeyError as exc:
            raise RecordError(f"{where}: missing {exc}") from None
        if not storage:
            raise RecordError(f"{where}: no storage, and no default_storage is set")
        if not all(isinstance(v, str) and v for v in (primary, storage, group)):
            raise RecordError(f"{where}: primary, storage and trust_group must be text")
        if ":" in group:
            # Reserved: a peer node's connection gets trust group "cluster:node".
            raise RecordError(f"{where}: a trust group cannot contain ':'")
        try:
            entry = AuthorizationEntry(
                primary="*.any" if primary == "*" else primary,
                storage=root / storage,
                trust_group=group,
            )
        except ValueError as exc:
            raise RecordError(f"{where}: {exc}") from None
        if primary == "*":
            any_primary = entry
        else:
            normal.append(entry)
    return Authorization(entries=tuple(normal), any_primary=any_primary)

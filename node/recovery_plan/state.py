"""A plan run's record of the steps it finished, so that a re-run carries on.

One JSON file per plan and mode (``<plan>.<mode>.run.json`` beside the plan, or
``[plan] state``), replaced atomically after every VM and every group: a run stopped at
any point (a failing hook, a timeout, a kill) is carried on by running it again, from
the group it stopped in and without redoing that group's VMs that were done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.primary.state import write_file_atomic


@dataclass
class RunState:
    """What a plan's runs in one mode finished."""

    path: Path
    #: The group's point chosen by the first run (VM -> sequence): every re-run uses it.
    points: dict[str, int] = field(default_factory=dict)
    groups_done: list[str] = field(default_factory=list)
    #: VM -> what was done to it ("built": a test copy, "failed-over", "done": started).
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunState:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a plan run's record")
        return cls(
            path,
            {str(k): int(v) for k, v in doc.get("points", {}).items()},
            [str(g) for g in doc.get("groups_done", [])],
            {str(k): dict(v) for k, v in doc.get("vms", {}).items()},
        )

    def save(self) -> None:
        doc = {"points": self.points, "groups_done": self.groups_done, "vms": self.vms}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def vm(self, name: str) -> dict[str, Any]:
        return self.vms.get(name, {})

    def note(self, name: str, **what: Any) -> None:
        """Record (durably) what was done to VM ``name``."""
        self.vms[name] = {**self.vms.get(name, {}), **what}
        self.save()

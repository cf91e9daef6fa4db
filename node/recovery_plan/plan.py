"""The recovery plan file (TOML), in the style of the other configuration files.

Example (``docs/recovery-plans.md`` has the whole format)::

    [plan]
    name = "shop"
    recovery_config = "server.toml"   # the recovery server's file (relative to this one)
    primary_config = "primary.toml"   # the primary's file: planned failover, group capture
    consistent = true                 # fail over to the group's common point
    test_dir = "test-failovers"       # where a test failover builds the VMs

    [[group]]                         # boot groups, in order
    name = "databases"
    vms = ["db01", "db02"]            # names or VMIDs
    timeout = 120                     # seconds for the group's step
    before = "notify-start.sh"        # hook before the group's VMs fail over
    start = "start-vm.sh"             # hook per VM (FRREP_VM_DIR, FRREP_DISKS...)
    after = "check-db.sh"             # hook once they are up (a health check)
    stop = "stop-vm.sh"               # hook per VM: a planned failover's stop at the
                                      # primary, a test failover's cleanup
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from frlink.config import ConfigError, read_checked, string
from frlink.config_keys import Schema, Table

#: The steps of a plan are named after its groups: safe in a file name and a table.
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
#: A group's step may run this long by default (seconds).
DEFAULT_TIMEOUT: Final = 300.0

PLAN_SCHEMA: Schema = {
    "plan": Table(
        {
            "name": str,
            "recovery_config": str,
            "primary_config": str,
            "consistent": bool,
            "test_dir": str,
            "state": str,
        }
    ),
    "group": Table(
        {
            "name": str,
            "vms": list,
            "timeout": float,
            "before": str,
            "start": str,
            "after": str,
            "stop": str,
        },
        array=True,
    ),
}


@dataclass(frozen=True, slots=True)
class BootGroup:
    """VMs that start together; the next group waits until this one's step is done."""

    name: str
    vms: tuple[str, ...]  #: names or VMIDs, as the plan gives them
    timeout: float = DEFAULT_TIMEOUT
    before: str | None = None
    start: str | None = None
    after: str | None = None
    stop: str | None = None


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """A named group of VMs, failed over together in boot groups."""

    name: str
    path: Path  #: the plan file
    groups: tuple[BootGroup, ...]
    recovery_config: Path | None = None
    primary_config: Path | None = None
    consistent: bool = False
    test_dir: Path | None = None
    state: Path | None = None

    @property
    def vms(self) -> list[str]:
        """Every VM of the plan, in boot order."""
        return [vm for g in self.groups for vm in g.vms]

    @property
    def state_file(self) -> Path:
        """Where a run records the steps it finished (a re-run carries on from there)."""
        return self.state or self.path.with_name(f"{self.name}.run.json")


def _optional(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def load_plan(path: Path) -> RecoveryPlan:
    """Read and check a plan file.

    Raises:
        ConfigError: the file cannot be read, or says something wrong (the message says
            what and where).
    """
    path = Path(path).absolute()
    data = read_checked(path, PLAN_SCHEMA)
    head = data.get("plan")
    if not isinstance(head, dict):
        raise ConfigError(f"{path}: [plan] is missing")
    name = string(head, "name", f"{path} [plan]")
    if not _NAME.match(name):
        raise ConfigError(f"{path}: [plan] name {name!r}: letters, digits, '.', '_', '-'")
    groups: list[BootGroup] = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("group", []), 1):
        where = f"{path} [[group]] #{i}"
        gname = string(raw, "name", where)
        if not _NAME.match(gname) or gname in {g.name for g in groups}:
            raise ConfigError(f"{where}: name {gname!r} is not a new safe name")
        vms = raw.get("vms")
        if not isinstance(vms, list) or not vms or not all(isinstance(v, str) for v in vms):
            raise ConfigError(f"{where}: vms must be a list of VM names or VMIDs")
        again = seen.intersection(vms)
        if again:
            raise ConfigError(f"{where}: {sorted(again)} already in an earlier group")
        seen.update(vms)
        timeout = float(raw.get("timeout", DEFAULT_TIMEOUT))
        if timeout <= 0:
            raise ConfigError(f"{where}: timeout must be more than 0 seconds")
        groups.append(
            BootGroup(
                gname,
                tuple(vms),
                timeout,
                _optional(raw, "before"),
                _optional(raw, "start"),
                _optional(raw, "after"),
                _optional(raw, "stop"),
            )
        )
    if not groups:
        raise ConfigError(f"{path}: a plan needs at least one [[group]]")

    def rel(key: str) -> Path | None:
        value = _optional(head, key)
        return None if value is None else path.parent / value

    return RecoveryPlan(
        name,
        path,
        tuple(groups),
        recovery_config=rel("recovery_config"),
        primary_config=rel("primary_config"),
        consistent=bool(head.get("consistent", False)),
        test_dir=rel("test_dir"),
        state=rel("state"),
    )

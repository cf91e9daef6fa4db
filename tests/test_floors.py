"""The floors of the house (docs/architecture.md): every module's imports, at module level
and inside functions, go only downwards.

From the bottom: the wire (frproto); the link (frlink: TLS, accept, authorization,
certificates); the broker and the node's roles side by side (the replica storage, the
recovery server on it, the primary; the out-of-band file format is the one thing the two
roles share); failover workflows above both roles; the web console (frconsole) above the
broker; the cluster node agent (frcluster) above the broker, the console and the node;
the testing helpers (frtesting) above all of them; frctl on top. frconform, the
conformance harness, speaks the wire only.

The test parses the source, so an import hidden in a function (to dodge a cycle) counts
as much as one at the top. ``FRREP_FLOORS_ROOT`` points it at another checkout (that is
how it was shown to fail on the layout before the floors).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("FRREP_FLOORS_ROOT", Path(__file__).resolve().parent.parent))
PACKAGES = (
    "frproto",
    "frlink",
    "broker",
    "node",
    "frconsole",
    "frcluster",
    "frtesting",
    "frctl",
    "frconform",
)

#: The recovery server's own modules (the rest of ``node`` is in the rooms below).
_SERVER = "node(server)"
#: The one module of frconsole that may read the node (frconsole/standalone.py).
_STANDALONE_CONSOLE = "frconsole.standalone"

#: Room -> the rooms it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "frproto": frozenset(),
    "frconform": frozenset({"frproto"}),
    "frlink": frozenset({"frproto"}),
    "broker": frozenset({"frproto", "frlink"}),
    # Starting a file's write-back early (sync_file_range): a leaf, under both the
    # storage engine (a batch's journal) and the primary (a pending cycle).
    "node.writeback": frozenset(),
    "node.storage": frozenset({"frproto", "node.writeback"}),
    "node.oob_file": frozenset({"frproto"}),
    "node.primary": frozenset({"frproto", "frlink", "node.oob_file", "node.writeback"}),
    _SERVER: frozenset({"frproto", "frlink", "node.storage", "node.oob_file"}),
    "node.failover": frozenset({"frproto", "frlink", "node.storage", "node.primary"}),
    # Recovery plans run failovers of many VMs, at the recovery server (its
    # configuration) and at the primary (a planned failover's prepare, group capture).
    "node.recovery_plan": frozenset(
        {"frproto", "frlink", "node.storage", "node.primary", "node.failover", _SERVER}
    ),
    "frtesting.server": frozenset(
        {"frproto", "frlink", "node.storage", "node.primary", "node.oob_file", _SERVER}
    ),
    "frconsole": frozenset({"frproto", "frlink", "broker"}),
    # A stand-alone recovery server's console reads the server's configuration and its
    # replicas' state files (read-only, no store opened) and builds test failovers
    # (node/failover/test.py); the rest of frconsole, the cluster's pages among them,
    # still knows no node room.
    _STANDALONE_CONSOLE: frozenset(
        {"frproto", "frlink", "broker", "frconsole", "node.storage", "node.failover", _SERVER}
    ),
    # A node's console shows a replica as the stand-alone console does (report_of): the
    # stand-alone console's room stands on nothing frcluster may not import itself.
    "frcluster": frozenset(
        {
            "frproto",
            "frlink",
            "broker",
            "frconsole",
            _STANDALONE_CONSOLE,
            "node.storage",
            "node.oob_file",
            "node.primary",
            "node.failover",
            _SERVER,
        }
    ),
}
#: The testing helpers (frtesting) stand on every product room; nothing in them imports it.
ALLOWED["frtesting"] = frozenset(ALLOWED)
#: frctl, on top, may import every room (its demo runs on frtesting's loopback cluster).
ALLOWED["frctl"] = frozenset(ALLOWED) | {"frconform"}

_NODE_ROOMS = ("storage", "primary", "failover", "recovery_plan", "oob_file", "writeback")


def room(module: str) -> str:
    """The room a dotted module name belongs to."""
    parts = module.split(".")
    if parts[0] == "node":
        if len(parts) > 1 and parts[1] in _NODE_ROOMS:
            return f"node.{parts[1]}"
        return _SERVER
    if module == _STANDALONE_CONSOLE:
        return _STANDALONE_CONSOLE
    return parts[0]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every import in the file, wherever it stands."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                # ``from . import x`` imports the submodule x.
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                assert node.module is not None
                target = node.module
            yield node.lineno, target


def product_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def violations() -> list[str]:
    found = []
    for path in product_modules():
        mine = room(_module_name(path))
        allowed = ALLOWED.get(mine)
        if allowed is None:
            found.append(f"{path.relative_to(ROOT)}: room {mine!r} is on no floor")
            continue
        for line, target in imports(path):
            if target.split(".")[0] not in PACKAGES:
                continue
            theirs = room(target)
            if theirs != mine and theirs not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs})")
    return found


def test_every_import_goes_down_the_floors() -> None:
    assert violations() == []


def test_every_package_has_modules() -> None:
    # A renamed package would otherwise pass the floor test by having nothing to check.
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("node.recovery_server", _SERVER),
        ("node", _SERVER),
        ("node.primary.replicator", "node.primary"),
        ("node.storage.replica", "node.storage"),
        ("frcluster.agent", "frcluster"),
        ("broker.store.etcd", "broker"),
        ("frconsole.app", "frconsole"),
        ("frconsole.standalone", "frconsole.standalone"),
    ],
)
def test_rooms_are_named_as_documented(module: str, expected: str) -> None:
    assert room(module) == expected


def test_the_architecture_page_names_only_what_exists() -> None:
    # docs/architecture.md tells a newcomer where each concept lives: every module or
    # folder it names must be there, and every room of the floors must be on it.
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:fr\w+|broker|node)/[\w/]*(?:\.py)?)", page))
    assert len(named) > 30
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert missing == []
    for room_name in ALLOWED:
        top = room_name.split("(")[0].replace(".", "/")
        assert f"{top}/" in page or f"{top}.py" in page, room_name

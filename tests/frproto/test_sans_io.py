"""frproto does no I/O: only frproto/trio_io.py may import I/O, clock or concurrency modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import frproto

PACKAGE = Path(frproto.__file__).parent
FORBIDDEN = frozenset(
    {"trio", "socket", "ssl", "os", "time", "asyncio", "selectors", "threading", "subprocess"}
)
ALLOWED = {"trio_io.py"}


def imported_modules(tree: ast.AST) -> list[str]:
    """Every absolute module name an ``import`` or ``from ... import`` statement names."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            # ``from os import path`` imports os.path; keep the pairs for the record.
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden_in(source: str) -> list[str]:
    return sorted(
        {name for name in imported_modules(ast.parse(source)) if name.split(".")[0] in FORBIDDEN}
    )


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import os", ["os"]),
        ("import os.path", ["os.path"]),
        ("from os import path", ["os", "os.path"]),
        ("from os.path import join", ["os.path", "os.path.join"]),
        ("import trio as t", ["trio"]),
        ("def f():\n    import socket\n", ["socket"]),
        ("if True:\n    from time import monotonic\n", ["time", "time.monotonic"]),
        ("import ssl, uuid", ["ssl"]),
        ("from . import os", []),
        ("import ossaudiodev, timeit, trio_foo", []),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import threading\n",
            ["threading"],
        ),
    ],
)
def test_checker_finds_every_form(source: str, found: list[str]) -> None:
    assert forbidden_in(source) == found


def test_package_has_modules() -> None:
    names = {p.name for p in PACKAGE.glob("*.py")}
    assert {"__init__.py", "_connection.py", "_wire.py", "trio_io.py"} <= names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_module_is_sans_io(path: Path) -> None:
    found = forbidden_in(path.read_text(encoding="utf-8"))
    if path.name in ALLOWED:
        assert "trio" in found  # the one I/O module really is the one that uses trio
    else:
        assert found == [], f"{path.name} imports {found}"


def test_import_does_not_load_trio() -> None:
    code = (
        "import sys\n"
        "import frproto\n"
        "c = frproto.Connection(frproto.Role.PRIMARY)\n"
        "c.send(frproto.NegotiateRequest())\n"
        "bad = sorted(m for m in ('trio', 'asyncio', 'frproto.trio_io') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""

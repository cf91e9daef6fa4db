"""frproto's public names: a small top level, three public modules, the old names kept.

The limits moved to ``frproto.limits``, the codec helpers to ``frproto.codec`` and the
JSON helpers to ``frproto.jsonable``; the old top-level names still work for one release,
with a DeprecationWarning, and so do the exceptions' ``to_message()`` and ``error``. The
repository itself uses only the new names (checked by reading its sources), and the
package's own modules import each other without a circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import frproto
from frproto import codec, jsonable, limits
from frproto._deprecated import MOVED

PACKAGE = Path(frproto.__file__).parent
ROOT = PACKAGE.parent
NEW_HOMES = {"limits": limits, "codec": codec, "jsonable": jsonable}


def test_the_top_level_is_small() -> None:
    assert (
        len(frproto.__all__) == len(set(frproto.__all__)) == 81
    )  # refuse_negotiation (NEG-12); FailoverRequest/Done/Ask/Decline (1.1)
    assert not set(frproto.__all__) & set(MOVED)
    for name in frproto.__all__:
        assert hasattr(frproto, name), name


@pytest.mark.parametrize("module", sorted(NEW_HOMES))
def test_public_modules_export_what_they_list(module: str) -> None:
    found = NEW_HOMES[module]
    for name in found.__all__:
        assert hasattr(found, name), f"frproto.{module}.{name}"


def test_every_moved_name_has_its_new_home() -> None:
    for name, module in MOVED.items():
        assert name in NEW_HOMES[module].__all__, f"{name} not in frproto.{module}"


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_top_level_name_works_and_warns(name: str) -> None:
    new = getattr(NEW_HOMES[MOVED[name]], name)
    with pytest.warns(DeprecationWarning, match=rf"frproto\.{name} moved to frproto\."):
        old = getattr(frproto, name)
    assert old is new


def test_old_from_import_warns_at_the_importer() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from frproto import MAX_CHUNK_DATA
    assert MAX_CHUNK_DATA == limits.MAX_CHUNK_DATA
    # The import machinery looks the name up twice (hasattr, then getattr), so Python
    # may report it twice; one of them names the importing line.
    assert {w.category for w in caught} == {DeprecationWarning}
    assert __file__ in {w.filename for w in caught}


def test_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NO_SUCH_NAME'"):
        _ = frproto.NO_SUCH_NAME


def test_old_exception_methods_work_and_warn() -> None:
    exc = frproto.ChunkOutOfRange("past the end")
    want = frproto.Error.from_exception(exc)
    assert want == frproto.Error(frproto.ErrorCode.CHUNK_OUT_OF_RANGE, "past the end")
    with pytest.warns(DeprecationWarning, match="to_message"):
        assert exc.to_message() == want  # type: ignore[attr-defined]
    with pytest.warns(DeprecationWarning, match="RemoteProtocolError.error"):
        assert exc.error == want  # type: ignore[attr-defined]
    refusal = frproto.VMNotHere("moved")
    with pytest.warns(DeprecationWarning, match="to_message"):
        assert refusal.to_message() == frproto.Error(3, "moved")  # type: ignore[attr-defined]


# -- the repository uses the new names ----------------------------------------------------


def _sources() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:  # pragma: no cover - not a git checkout
        return sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts)
    return [ROOT / line for line in listed.stdout.splitlines()]


def old_names_used(source: str) -> list[str]:
    """Moved names used through ``frproto``/``fp`` or imported from ``frproto``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("fp", "frproto")
            and node.attr in MOVED
        ):
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module == "frproto" and node.level == 0:
            found.extend(
                f"from frproto import {a.name} (line {node.lineno})"
                for a in node.names
                if a.name in MOVED
            )
    return found


def test_checker_finds_old_names() -> None:
    source = "import frproto as fp\nfp.MAX_NAME\nfp.limits.MAX_NAME\nfrom frproto import describe\n"
    assert set(old_names_used(source)) == {
        "fp.MAX_NAME (line 2)",
        "from frproto import describe (line 4)",
    }


def test_the_repository_uses_only_the_new_names() -> None:
    here = Path(__file__).resolve()
    used = {
        str(path.relative_to(ROOT)): found
        for path in _sources()
        if path.resolve() != here and path.is_file()
        for found in [old_names_used(path.read_text(encoding="utf-8"))]
        if found
    }
    assert used == {}


# -- no import circle inside the package ----------------------------------------------------


def _imports_of(path: Path) -> set[str]:
    """The frproto modules that ``path`` imports, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module)
            else:
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "frproto" and len(parts) > 1:
                names.add(parts[1])
    return names


def test_errors_import_nothing_of_the_messages() -> None:
    assert _imports_of(PACKAGE / "_errors.py") == set()


def test_no_import_circle_between_modules() -> None:
    graph = {p.stem: _imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_import_names_the_new_modules_without_warning() -> None:
    code = (
        "import warnings\n"
        "warnings.simplefilter('error')\n"
        "import frproto\n"
        "frproto.codec.encode_frame(frproto.NegotiateRequest())\n"
        "print(frproto.limits.MAX_CHUNK_DATA, frproto.jsonable.describe(frproto.Keepalive()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split()[0] == str(limits.MAX_CHUNK_DATA)

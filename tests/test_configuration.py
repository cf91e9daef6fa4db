"""The configuration reference (docs/configuration.md) and the samples in examples/ against
the real loaders.

Which keys a loader reads is observed, not listed by hand: the parsed TOML is handed to
the loader wrapped in dictionaries that record every key asked for (``get``, ``[]``,
``in``), and an optional table the file leaves out is handed over empty, still recording.
So a key added to a loader and not to the reference fails here, and so does a key the
reference lists that no loader reads any more.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from frcluster import config as node_config
from node import config as server_config
from node.primary import config as primary_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "examples"

#: A key as (file section, table, key); a table itself as (file, table, "").
Key = tuple[str, str, str]


@dataclass(frozen=True)
class ConfigFile:
    """One kind of configuration file: its sample's name and where its loader lives."""

    sample: str
    module: Any
    load: Callable[[Path], object]
    #: Tables whose keys are free-form names (``[hosts]``): documented as a whole.
    free_form: frozenset[str] = frozenset()
    #: The tables and keys the loader admits (anything else is refused at load).
    schema: Any = None


FILES = (
    ConfigFile(
        "server.toml",
        server_config,
        server_config.load_recovery_server_config,
        schema=server_config.RECOVERY_SERVER_SCHEMA,
    ),
    ConfigFile(
        "primary.toml",
        primary_config,
        primary_config.load_primary_config,
        frozenset({"hosts"}),
        schema=primary_config.PRIMARY_SCHEMA,
    ),
    ConfigFile(
        "node.toml",
        node_config,
        node_config.load_cluster_node_config,
        schema=node_config.CLUSTER_NODE_SCHEMA,
    ),
)


class _Recording(dict[str, Any]):
    """A TOML table that notes every key a loader asks for in ``read``."""

    def __init__(self, data: dict[str, Any], table: str, read: set[tuple[str, str]]) -> None:
        super().__init__({k: _wrap(v, table or k, read) for k, v in data.items()})
        self._table = table
        self._read = read

    def _note(self, key: object) -> None:
        self._read.add((self._table, str(key)))

    def get(self, key: str, default: Any = None) -> Any:
        self._note(key)
        if key not in self.keys() and isinstance(default, dict) and not self._table:
            # An optional table left out: hand it over empty, still recording.
            return _Recording({}, key, self._read)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        # dict(table, ...) copies through keys() and __getitem__, which notes each key.
        return iter(list(self.keys()))


def _wrap(value: Any, table: str, read: set[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return _Recording(value, table, read)
    if isinstance(value, list):
        return [_wrap(v, table, read) for v in value]
    return value


def with_options(kind: ConfigFile, tmp_path: Path) -> Path:
    """The sample with every option it shows commented out (``# key = ...``, ``# [table]``)
    turned on: the optional tables a loader reads only when present are then read too."""
    text = (EXAMPLES / kind.sample).read_text()
    full = tmp_path / kind.sample
    full.write_text(re.sub(r"(?m)^# ((?:\[|[a-z_]+ = ).*)$", r"\1", text))
    return full


def keys_read(kind: ConfigFile, path: Path, monkeypatch: pytest.MonkeyPatch) -> set[Key]:
    """Every (table, key) the loader of ``kind`` asks for while loading ``path``."""
    read: set[tuple[str, str]] = set()
    real = kind.module.read_checked
    monkeypatch.setattr(
        kind.module, "read_checked", lambda p, schema: _Recording(real(p, schema), "", read)
    )
    kind.load(path)
    monkeypatch.undo()
    return {
        (kind.sample, table or key, "" if not table else key)
        for table, key in read
        if table not in kind.free_form or not table
    }


def documented() -> set[Key]:
    """The keys docs/configuration.md lists: a ``## ... `FILE` `` heading per file, a
    ``### `[table]` `` heading per table, a row per key (free-form tables: no key)."""
    found: set[Key] = set()
    sample = table = ""
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            named = re.search(r"`([a-z]+\.toml)`", line)
            sample, table = (named.group(1) if named else ""), ""
        elif line.startswith("### ") and sample:
            table = re.fullmatch(r"### `\[\[?([a-z_]+)\]\]?`", line).group(1)  # type: ignore[union-attr]
            found.add((sample, table, ""))
        elif line.startswith("| `") and table:
            found.add((sample, table, line.split("`")[1]))
    return found


def sample_keys(kind: ConfigFile, path: Path) -> set[Key]:
    data = tomllib.loads(path.read_text())
    out: set[Key] = set()
    for table, body in data.items():
        out.add((kind.sample, table, ""))
        rows = body if isinstance(body, list) else [body]
        if table not in kind.free_form:
            out |= {(kind.sample, table, key) for row in rows for key in row}
    return out


@pytest.mark.parametrize("kind", FILES, ids=lambda k: k.sample)
def test_every_key_a_loader_reads_is_in_the_reference(
    kind: ConfigFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read = keys_read(kind, with_options(kind, tmp_path), monkeypatch)
    listed = {k for k in documented() if k[0] == kind.sample}
    assert read - listed == set(), "read by the loader, missing from docs/configuration.md"
    assert listed - read == set(), "in docs/configuration.md, read by no loader"


@pytest.mark.parametrize("kind", FILES, ids=lambda k: k.sample)
def test_the_keys_a_loader_admits_are_the_reference(kind: ConfigFile) -> None:
    """The schema that refuses unknown keys (frlink/config_keys.py) and the reference
    name the same tables and keys: a key documented but refused, or admitted but not
    documented, fails here."""
    admitted: set[Key] = set()
    for table, spec in kind.schema.items():
        admitted.add((kind.sample, table, ""))
        if table not in kind.free_form:
            admitted |= {(kind.sample, table, key) for key in spec.keys}
    assert admitted == {k for k in documented() if k[0] == kind.sample}


@pytest.mark.parametrize("kind", FILES, ids=lambda k: k.sample)
def test_every_key_of_a_sample_is_in_the_reference(kind: ConfigFile, tmp_path: Path) -> None:
    assert sample_keys(kind, with_options(kind, tmp_path)) - documented() == set()


def test_every_example_loads_with_its_loader() -> None:
    loaders = {kind.sample: kind.load for kind in FILES}
    samples = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in samples} >= set(loaders)
    for path in samples:
        load = next((f for name, f in loaders.items() if path.name.endswith(name)), None)
        assert load is not None, f"{path.name}: no loader for it (name it *server.toml...)"
        load(path)


@pytest.mark.parametrize("kind", FILES, ids=lambda k: k.sample)
def test_the_options_a_sample_shows_commented_out_load_too(
    kind: ConfigFile, tmp_path: Path
) -> None:
    full = with_options(kind, tmp_path)
    assert full.read_text() != (EXAMPLES / kind.sample).read_text()
    kind.load(full)


def test_the_recorder_sees_a_key_added_to_a_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check above must fail when a loader reads a key the reference does not list.
    kind = FILES[0]
    real = kind.load

    def load_more(path: Path) -> object:
        kind.module.read_checked(path, kind.schema)["server"].get("new_key")
        return real(path)

    more = ConfigFile(kind.sample, kind.module, load_more)
    read = keys_read(more, EXAMPLES / kind.sample, monkeypatch)
    assert ("server.toml", "server", "new_key") in read
    assert ("server.toml", "server", "new_key") not in documented()


def test_the_readme_quick_start_shows_the_samples_whole() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("server.toml", "primary.toml"):
        assert (EXAMPLES / name).read_text().strip() in readme, name

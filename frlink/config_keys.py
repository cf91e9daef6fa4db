"""Which keys a configuration file may hold, of which type, refused with their line.

Each loader (recovery server, primary, cluster node) declares its tables here as a
:data:`Schema`; :func:`check_keys` refuses a table or key the loader does not know (a
typo such as ``prot = 7444`` would otherwise be ignored and the default used) and a
value of the wrong type, naming the file, the line and the closest known key.

``tomllib`` keeps no positions, so the line is found again in the text
(:func:`key_line`): the configuration files are small and flat (tables of scalar keys),
which a scan of table headers and ``key =`` lines covers without a second parser.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The types a key may have: TOML strings, integers, floats (an integer is accepted),
#: booleans and arrays.
KeyType = type | tuple[type, ...]

_TYPE_WORDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}


class ConfigKeyError(Exception):
    """An unknown table or key, or a value of the wrong type; the message says where.

    The loaders (:func:`frlink.config.read_checked`) raise it again as
    :class:`frlink.config.ConfigError`, the one error their callers catch."""


@dataclass(frozen=True, slots=True)
class Table:
    """One table of a configuration file: its keys and their types.

    ``keys`` empty and ``values`` set: any key (a name -> value table such as
    ``[hosts]``), each value of type ``values``."""

    keys: Mapping[str, KeyType] = field(default_factory=dict)
    #: ``[[name]]``: an array of tables.
    array: bool = False
    values: KeyType | None = None


#: A file's tables by name.
Schema = Mapping[str, Table]


def _words(kind: KeyType) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        _TYPE_WORDS.get(k, f"an {k.__name__}" if k is list else k.__name__) for k in kinds
    )


def _has_type(value: Any, kind: KeyType) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k not in (int, float) and isinstance(value, k):
            return True
    return False


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("([^"]*)"|'([^']*)'|[A-Za-z0-9_.-]+)\s*=""")


def _unquote(name: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in name.split("."))


def key_line(text: str, table: str | None, key: str | None, index: int = 0) -> int | None:
    """The line (1-based) of ``key`` in ``[table]`` (the ``index``-th ``[[table]]`` of an
    array), or of the table's header when ``key`` is None; None if not found (a key
    written as a dotted key or an inline table)."""
    current: str | None = None
    seen: dict[str, int] = {}
    header_line: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header and not _KEY.match(line):
            current = _unquote(header.group(2))
            count = seen.get(current, -1) + 1
            seen[current] = count
            if current == table and count == index:
                header_line = number
                if key is None:
                    return number
            continue
        if key is None:
            continue
        match = _KEY.match(line)
        if match is None:
            continue
        name = match.group(2) if match.group(2) is not None else match.group(3)
        name = name if name is not None else _unquote(match.group(1))
        if current == table and seen.get(current or "", 0) == index and name == key:
            return number
        if table is None and current is None and name == key:
            return number
    return header_line if key is None else None


def _where(path: Path, text: str, table: str | None, key: str | None, index: int = 0) -> str:
    line = key_line(text, table, key, index)
    return f"{path}:{line}" if line is not None else str(path)


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(data: Mapping[str, Any], schema: Schema, path: Path, text: str) -> None:
    """Refuse what ``schema`` does not know in ``data`` (parsed from ``text``).

    Raises:
        ConfigKeyError: ``FILE:LINE: [table] unknown key 'prot' (did you mean 'port'?)``,
            an unknown table, or ``... 'port' must be a whole number, not "7443"``.
    """
    for name, value in data.items():
        spec = schema.get(name)
        if spec is None:
            kind = "table" if isinstance(value, (dict, list)) else "key"
            where = (
                _where(path, text, name, None)
                if kind == "table"
                else _where(path, text, None, name)
            )
            raise ConfigKeyError(
                f"{where}: "
                f"unknown {kind} {name!r}{_suggest(name, sorted(schema))}; "
                f"known tables: {', '.join(sorted(schema))}"
            )
        if spec.array:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigKeyError(
                    f"{_where(path, text, None, name)}: {name!r} must be [[{name}]] tables"
                )
            for index, item in enumerate(value):
                _check_table(item, spec, name, index, path, text)
        else:
            if not isinstance(value, dict):
                raise ConfigKeyError(
                    f"{_where(path, text, None, name)}: {name!r} must be a [{name}] table"
                )
            _check_table(value, spec, name, 0, path, text)


def _check_table(
    value: Mapping[str, Any], spec: Table, name: str, index: int, path: Path, text: str
) -> None:
    label = f"[[{name}]] #{index + 1}" if spec.array else f"[{name}]"
    for key, item in value.items():
        if spec.values is not None and not spec.keys:
            if isinstance(item, dict):
                continue  # an unquoted dotted name: the loader says to quote it
            kind = spec.values
        elif key in spec.keys:
            kind = spec.keys[key]
        else:
            known = sorted(spec.keys)
            raise ConfigKeyError(
                f"{_where(path, text, name, key, index)}: {label} unknown key {key!r}"
                f"{_suggest(key, known)}; known keys: {', '.join(known)}"
            )
        if not _has_type(item, kind):
            shown = f'"{item}"' if isinstance(item, str) else repr(item)
            if isinstance(item, bool):
                shown = "true" if item else "false"
            raise ConfigKeyError(
                f"{_where(path, text, name, key, index)}: {label} {key!r} must be "
                f"{_words(kind)}, not {shown}"
            )

"""What the harness reads besides its code: the protocol document and the golden vectors.

They are package data (``frconform/data/``, links to ``docs/protocol.md`` and
``tests/vectors/`` in the repository, followed when the wheel is built), opened through
:mod:`importlib.resources`, so that ``frctl conform`` works the same from a source
checkout, an editable install and an installed wheel.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final, Literal

__all__ = ["VECTOR_KINDS", "export_spec", "protocol_document", "vectors"]

#: The two kinds of golden vectors: valid frames, and inputs a receiver must refuse.
VECTOR_KINDS: Final = ("errors", "messages")


def _data() -> Traversable:
    return files("frconform") / "data"


def protocol_document() -> Traversable:
    """The protocol specification (``docs/protocol.md``) that holds the requirements."""
    return _data() / "protocol.md"


def vectors(kind: Literal["errors", "messages"]) -> Traversable:
    """The directory of golden vectors of ``kind`` (``tests/vectors/<kind>/``)."""
    return _data() / "vectors" / kind


def export_spec(directory: Path) -> list[Path]:
    """Write the specification as published, for an implementer without this package's
    source: ``directory/protocol.md`` and the golden vectors it defines (its section 12)
    in ``directory/vectors/<kind>/``. Files of the same names are replaced; nothing else
    in ``directory`` is touched. Returns the files written."""
    written = [directory / "protocol.md"]
    directory.mkdir(parents=True, exist_ok=True)
    written[0].write_bytes(protocol_document().read_bytes())
    for kind in VECTOR_KINDS:
        out = directory / "vectors" / kind
        out.mkdir(parents=True, exist_ok=True)
        source = vectors(kind)
        for item in sorted(source.iterdir(), key=lambda t: t.name):
            if item.name.endswith(".json"):
                (out / item.name).write_bytes(item.read_bytes())
                written.append(out / item.name)
    return written

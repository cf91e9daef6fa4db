"""What the harness reads besides its code: the protocol document and the golden vectors.

They are package data (``frconform/data/``, links to ``docs/protocol.md`` and
``tests/vectors/`` in the repository, followed when the wheel is built), opened through
:mod:`importlib.resources`, so that ``frctl conform`` works the same from a source
checkout, an editable install and an installed wheel.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Final, Literal

__all__ = ["VECTOR_KINDS", "protocol_document", "vectors"]

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

"""The requirements of ``docs/protocol.md``, by id, for the conformance harness.

Every requirement of the protocol document is one line that holds an id in bold square
brackets followed by one sentence::

    * **[NEG-3]** A recovery side MUST answer a NegotiateRequest whose ...
    | **[SES-4]** A receiver MUST refuse an IRBegin, ... | IRBegin, ... | `UNEXPECTED_MESSAGE` |

The line is a bullet, a one-line paragraph, or a table row; in a table the sentence ends
at the cell's ``|`` (the row's other cells, such as the error code, are the harness's to
read). The sentence names whom it binds first (one of :data:`SUBJECTS`, after "A") and
carries an RFC 2119 keyword (:data:`LEVELS`). A withdrawn requirement keeps its line and
id with the sentence "Withdrawn." (and why): its id stays taken, but it is not returned.

The document is package data (:func:`frconform.resources.protocol_document`, the
repository's ``docs/protocol.md``), so an installed wheel has it; any other copy can be
passed to :func:`load_requirements`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Final

from .resources import protocol_document

#: The protocol document, as shipped with this package (``docs/protocol.md``).
DOCUMENT: Final = protocol_document()

#: Whom a requirement can bind, as its sentence names it after "A" (longest first).
SUBJECTS: Final = (
    "stand-alone recovery server",
    "recovery server",
    "recovery side",
    "cluster node",
    "receiver",
    "primary",
    "sender",
    "broker",
)

#: The RFC 2119 levels a requirement can have.
LEVELS: Final = ("MUST NOT", "MUST", "SHOULD NOT", "SHOULD", "MAY")

#: Id prefixes and what they cover (``DEL`` is RelationshipDelete's).
PREFIXES: Final = {
    "TLS": "transport, TLS, mutual authentication and SNI (sections 1.2, 1.3)",
    "ENC": "conventions and shared field checks (section 2)",
    "ENV": "the envelope and framing (section 3)",
    "MSG": "per-message field checks (section 4)",
    "CHK": "Chunk checks and digests (section 4.13)",
    "BRK": "what a clustering broker answers (section 4.4)",
    "DEL": "RelationshipDelete (section 4.18)",
    "FOV": "planned failover: FailoverRequest, FailoverDone, FailoverAsk, FailoverDecline "
    "(sections 4.19-4.22)",
    "ERR": "error codes and closing behaviour (sections 6, 9.3)",
    "LIM": "limits (section 7)",
    "NEG": "negotiation and versioning (section 8)",
    "SM": "the state machine (section 9)",
    "SES": "session rules (section 10)",
    "REP": "what a recovery server or cluster node does (section 10.1)",
    "TIM": "deadlines, keepalive and connection limits (section 10.2)",
    "VEC": "the golden vectors (section 12)",
}

_ID_MARK = re.compile(r"\*\*\[([A-Za-z]+-[0-9]+)\]\*\*")
_WELL_FORMED_ID = re.compile(r"[A-Z]+-[1-9][0-9]*\Z")
_HEADING = re.compile(r"#{1,6}\s+(.*?)\s*#*\s*\Z")
_FENCE = re.compile(r"(```|~~~)")
_BULLET = re.compile(r"([*+-]|[0-9]+[.)])\s")
_LEVEL = re.compile(r"\b(MUST NOT|MUST|SHOULD NOT|SHOULD|MAY)\b")
_SUBJECT = re.compile(
    r"An? (" + "|".join(re.escape(s) for s in SUBJECTS) + r")\b", flags=re.IGNORECASE
)
_SECOND_SUBJECT = re.compile(
    r"\s*(?:,|and|or|/)\s*(?:an?\s+|the\s+)?(" + "|".join(re.escape(s) for s in SUBJECTS) + r")\b",
    flags=re.IGNORECASE,
)
_WITHDRAWN = re.compile(r"Withdrawn\b")


@dataclass(frozen=True)
class Requirement:
    """One requirement of the protocol document."""

    id: str
    #: The sentence, as written (Markdown), without the id.
    text: str
    #: "MUST", "MUST NOT", "SHOULD", "SHOULD NOT" or "MAY": its first RFC 2119 keyword.
    level: str
    #: Whom it binds, e.g. "recovery side" (one of :data:`SUBJECTS`).
    subject: str
    #: The heading it is under, e.g. "8. Negotiation and versioning".
    section: str

    @property
    def prefix(self) -> str:
        """The id's prefix, e.g. "NEG"."""
        return self.id.split("-", 1)[0]

    @property
    def number(self) -> int:
        """The id's number, e.g. 3 for "NEG-3"."""
        return int(self.id.split("-", 1)[1])


@dataclass(frozen=True)
class _Entry:
    id: str
    text: str
    section: str
    line: int


def _table_cells(line: str) -> list[str]:
    """The cells of a table row (an escaped ``\\|`` stays inside its cell)."""
    body = line.strip()
    body = body.removeprefix("|")
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return re.split(r"(?<!\\)\|", body)


def _entries(markdown: str) -> list[_Entry]:
    """Every id mark of the document, with its sentence and heading, in order."""
    entries: list[_Entry] = []
    section = ""
    fence: str | None = None
    for number, raw in enumerate(markdown.splitlines(), start=1):
        line = raw.strip()
        fenced = _FENCE.match(line)
        if fence is not None:
            if fenced and fenced.group(1) == fence:
                fence = None
            continue
        if fenced:
            fence = fenced.group(1)
            continue
        heading = _HEADING.fullmatch(line) if line.startswith("#") else None
        if heading:
            if _ID_MARK.search(line):
                raise ValueError(f"line {number}: a requirement id in a heading")
            section = heading.group(1)
            continue
        if not _ID_MARK.search(line):
            continue
        pieces = _table_cells(line) if line.startswith("|") else [line]
        for piece in pieces:
            marks = list(_ID_MARK.finditer(piece))
            if len(marks) > 1:
                ids = ", ".join(m.group(1) for m in marks)
                raise ValueError(f"line {number}: more than one requirement id ({ids})")
            if not marks:
                continue
            mark = marks[0]
            if not line.startswith("|"):
                before = piece[: mark.start()]
                bullet = _BULLET.match(before)
                if (before[bullet.end() :] if bullet else before).strip():
                    raise ValueError(
                        f"line {number}: requirement {mark.group(1)} must start its bullet "
                        "or paragraph (or sit in a table cell)"
                    )
            entries.append(_Entry(mark.group(1), piece[mark.end() :].strip(), section, number))
    return entries


def _requirement(entry: _Entry) -> Requirement:
    where = f"line {entry.line} ({entry.id})"
    if not _WELL_FORMED_ID.match(entry.id):
        raise ValueError(f"{where}: an id is PREFIX-N (capital letters, N from 1)")
    text = entry.text
    subject = _SUBJECT.match(text)
    if subject is None:
        raise ValueError(
            f"{where}: the sentence must start with its subject, one of "
            + ", ".join(f'"A {s}"' for s in SUBJECTS)
            + f": {text[:60]!r}"
        )
    if _SECOND_SUBJECT.match(text, subject.end()):
        raise ValueError(f"{where}: the sentence names more than one subject: {text[:60]!r}")
    level = _LEVEL.search(text)
    if level is None:
        raise ValueError(f"{where}: no RFC 2119 keyword (MUST, SHOULD, MAY...): {text[:60]!r}")
    return Requirement(
        id=entry.id,
        text=text,
        level=level.group(1),
        subject=subject.group(1).lower(),
        section=entry.section,
    )


def _checked(markdown: str) -> list[tuple[_Entry, Requirement | None]]:
    seen: dict[str, int] = {}
    out: list[tuple[_Entry, Requirement | None]] = []
    for entry in _entries(markdown):
        if entry.id in seen:
            raise ValueError(
                f"line {entry.line}: duplicate requirement id {entry.id} "
                f"(first on line {seen[entry.id]})"
            )
        seen[entry.id] = entry.line
        if _WITHDRAWN.match(entry.text):
            if not _WELL_FORMED_ID.match(entry.id):
                raise ValueError(f"line {entry.line} ({entry.id}): an id is PREFIX-N")
            out.append((entry, None))
        else:
            out.append((entry, _requirement(entry)))
    return out


def parse_requirements(markdown: str) -> dict[str, Requirement]:
    """The requirements of ``markdown`` by id, in the document's order (withdrawn ones left
    out).

    Raises:
        ValueError: naming the line, for a duplicate id, a malformed id, a sentence without
            an RFC 2119 keyword, a subject not in :data:`SUBJECTS` (or more than one), or
            an id out of place (a heading, the middle of a line, two in one line or cell).
    """
    return {e.id: r for e, r in _checked(markdown) if r is not None}


def withdrawn_ids(markdown: str) -> list[str]:
    """The ids of withdrawn requirements (their sentence is "Withdrawn..."), in order."""
    return [e.id for e, r in _checked(markdown) if r is None]


def load_requirements(path: Traversable | None = None) -> dict[str, Requirement]:
    """The requirements of the protocol document at ``path`` (a :class:`~pathlib.Path` or
    any traversable; default: the one shipped with this package, :data:`DOCUMENT`), by id
    in the document's order."""
    doc = DOCUMENT if path is None else path
    return parse_requirements(doc.read_text(encoding="utf-8"))

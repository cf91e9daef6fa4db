"""docs/protocol.md must not drift from frproto: tags, enums, error codes, limits, states.

The document is parsed simply: a section is found by its heading, and table rows by a
regular expression on ``| cell | cell |`` lines. Each test names what it compares so that
a failure says which part of the document to update.
"""

from __future__ import annotations

import enum
import re
import uuid
from pathlib import Path

import pytest

import frproto
from frproto import _enums, limits
from frproto._state import KEEPALIVE_STATES, REFUSAL_RETURNS, TRANSITIONS
from frproto.codec import CHUNK_FRAME_HEADER, CHUNK_HEADER

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
DOC = DOC_PATH.read_text(encoding="utf-8")

_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_VMID = uuid.UUID("12345678-1234-4234-8234-123456789abc")


def section(title_start: str) -> str:
    """Text of the section whose heading starts with ``title_start``, up to the next
    heading of the same or a higher level (subsections are included)."""
    lines = DOC.splitlines()
    for index, line in enumerate(lines):
        match = _HEADING.match(line)
        if match and match.group(2).startswith(title_start):
            level = len(match.group(1))
            body: list[str] = []
            for other in lines[index + 1 :]:
                found = _HEADING.match(other)
                if found and len(found.group(1)) <= level:
                    break
                body.append(other)
            return "\n".join(body)
    raise AssertionError(f"docs/protocol.md has no section {title_start!r}")


def table_rows(text: str) -> list[list[str]]:
    """Cells of every table row in ``text`` (backticks removed, header rules skipped)."""
    rows: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|", line):
            continue
        cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
        rows.append(cells)
    return rows


def parse_int(cell: str) -> int | None:
    """A decimal or 0x-hex integer cell, or None."""
    if re.fullmatch(r"0x[0-9A-Fa-f]+", cell):
        return int(cell, 16)
    if re.fullmatch(r"\d+", cell):
        return int(cell)
    return None


def wire_enums() -> list[type[enum.Enum]]:
    """Every integer enumeration defined in ``frproto._enums``."""
    found: list[type[enum.Enum]] = []
    for value in vars(_enums).values():
        if (
            isinstance(value, type)
            and issubclass(value, enum.Enum)
            and issubclass(value, int)
            and value.__module__ == _enums.__name__
        ):
            found.append(value)
    return found


def limit_constants() -> dict[str, object]:
    """Every public constant in ``frproto.limits``."""
    return {
        name: value
        for name, value in vars(limits).items()
        if name.isupper() and not name.startswith("_")
    }


# -- Tags and messages ---------------------------------------------------------------------


def test_every_message_tag_name_and_value_in_the_tag_table() -> None:
    rows = table_rows(section("5.1 MessageTag"))
    documented = {r[1]: parse_int(r[0]) for r in rows if len(r) >= 2 and parse_int(r[0])}
    expected = {tag.name: tag.value for tag in frproto.MessageTag}
    assert documented == expected


@pytest.mark.parametrize("tag", list(frproto.MessageTag), ids=lambda t: t.name)
def test_every_message_tag_appears_in_the_doc(tag: frproto.MessageTag) -> None:
    assert re.search(rf"\b{tag.name}\b", DOC)
    assert f"0x{tag.value:04x}" in DOC.lower()


def test_every_message_has_a_section_with_its_tag() -> None:
    for tag, cls in frproto.codec.MESSAGE_CLASSES.items():
        pattern = rf"^###\s+4\.\d+\s+{cls.__name__}\s+\(tag\s+`0x{tag.value:04x}`\)"
        assert re.search(pattern, DOC, re.MULTILINE | re.IGNORECASE), cls.__name__


def test_message_summary_table_tags() -> None:
    rows = table_rows(section("4. Messages"))
    by_name = {cls.__name__: tag for tag, cls in frproto.codec.MESSAGE_CLASSES.items()}
    summary = {r[0]: parse_int(r[1]) for r in rows if len(r) >= 4 and r[0] in by_name}
    assert summary == {name: tag.value for name, tag in by_name.items()}


def _fixed_size_samples() -> list[frproto.Message]:
    return [
        frproto.NegotiateRequest(),
        frproto.Keepalive(),
        frproto.RelationshipOpen(_VMID),
        frproto.RelationshipDelete(_VMID),
        frproto.IRBegin(_VMID),
        frproto.IREnd(_VMID, 0, 0, bytes(16)),
        frproto.BatchBegin(_VMID, 1, 0, 0),
        frproto.BatchEnd(_VMID, 0, 0, bytes(16)),
        frproto.Ack(_VMID, frproto.AckKind.IR_COMPLETE, 0),
        frproto.DigestMapRequest(_VMID, 0, frproto.limits.MIN_BLOCK_SIZE, 0, 1),
    ]


@pytest.mark.parametrize("message", _fixed_size_samples(), ids=lambda m: type(m).__name__)
def test_fixed_body_sizes_in_summary_table(message: frproto.Message) -> None:
    rows = table_rows(section("4. Messages"))
    sizes = {r[0]: r[3] for r in rows if len(r) >= 4}
    assert sizes[type(message).__name__] == str(len(message.encode_body()))


def test_chunk_frame_header_layout() -> None:
    assert CHUNK_HEADER.size == frproto.limits.CHUNK_HEADER_SIZE
    assert f"`{CHUNK_FRAME_HEADER.format}`" in DOC


# -- Enumerations ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", wire_enums(), ids=lambda k: k.__name__)
def test_every_enum_value_documented(kind: type[enum.Enum]) -> None:
    text = section(f"5.{_enum_section_number(kind)} {kind.__name__}")
    documented = {r[1]: parse_int(r[0]) for r in table_rows(text) if len(r) >= 2}
    documented = {name: value for name, value in documented.items() if value is not None}
    expected = {name: member.value for name, member in kind.__members__.items()}
    assert documented == expected


def _enum_section_number(kind: type[enum.Enum]) -> str:
    match = re.search(rf"^###\s+5\.(\d+)\s+{kind.__name__}\b", DOC, re.MULTILINE)
    assert match, f"no section 5.x for {kind.__name__}"
    return match.group(1)


def test_ignorable_bit_and_known_chunk_flags() -> None:
    assert f"IGNORABLE_TAG_BIT` = `0x{_enums.IGNORABLE_TAG_BIT:04x}`" in DOC
    assert f"KNOWN_CHUNK_FLAGS` = `0x{int(_enums.KNOWN_CHUNK_FLAGS):04x}`" in DOC


# -- Error codes -----------------------------------------------------------------------------


def test_every_error_code_name_and_number_in_registry() -> None:
    rows = table_rows(section("6. Error codes"))
    documented = {
        r[1]: parse_int(r[0]) for r in rows if len(r) >= 5 and parse_int(r[0]) is not None
    }
    assert documented == {code.name: code.value for code in frproto.ErrorCode}


@pytest.mark.parametrize("code", list(frproto.ErrorCode), ids=lambda c: c.name)
def test_error_code_class_documented(code: frproto.ErrorCode) -> None:
    rows = table_rows(section("6. Error codes"))
    row = next(r for r in rows if len(r) >= 5 and r[1] == code.name)
    cls = frproto.codec.ERROR_CLASSES.get(code)
    if cls is None:
        assert code is frproto.ErrorCode.OK
        return
    assert row[4] == cls.__name__


# -- Limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(limit_constants()))
def test_every_limit_documented_with_its_value(name: str) -> None:
    rows = table_rows(section("7. Limits"))
    documented = {r[0]: r[1] for r in rows if len(r) >= 2}
    assert name in documented, f"{name} missing from the Limits table"
    value = limit_constants()[name]
    cell = documented[name]
    if isinstance(value, tuple):
        assert cell.replace(" ", "") == str(value).replace(" ", "")
    else:
        assert parse_int(cell) == value


# -- State machine ---------------------------------------------------------------------------


def test_every_transition_in_the_table() -> None:
    rows = table_rows(section("9.2 Transitions"))
    sender = {frproto.Role.PRIMARY: "P", frproto.Role.RECOVERY: "R"}
    for (state, role, tag), target in TRANSITIONS.items():
        name = frproto.codec.MESSAGE_CLASSES[tag].__name__
        assert any(
            len(r) >= 4
            and r[0] == state.name
            and r[1] == sender[role]
            and r[2] == name
            and r[3].split()[0] == target.name
            for r in rows
        ), f"{state.name} --{name}({sender[role]})--> {target.name} not documented"


def test_transition_table_has_no_extra_rows() -> None:
    rows = table_rows(section("9.2 Transitions"))
    states = {s.name for s in frproto.State}
    documented = [r for r in rows if len(r) >= 4 and r[0] in states and r[1] in ("P", "R")]
    assert len(documented) == len(TRANSITIONS)


def test_refusal_returns_documented() -> None:
    rows = table_rows(section("9.2 Transitions"))
    table = {r[0]: r[1] for r in rows if len(r) == 2}
    for state, target in REFUSAL_RETURNS.items():
        assert table.get(state.name) == target.name


def test_keepalive_states_documented() -> None:
    match = re.search(r"`KEEPALIVE_STATES`:\s*([A-Z_,\s]+)\.", DOC)
    assert match
    documented = {s.strip() for s in match.group(1).split(",")}
    assert documented == {s.name for s in KEEPALIVE_STATES}


# -- Worked example and digests --------------------------------------------------------------


def test_worked_example_hex_matches_encoder() -> None:
    text = section("11. Worked example")
    match = re.search(r"```\s*\n\s*([0-9a-fA-F]+)\s*\n\s*```", text)
    assert match, "no hex code block in the worked example"
    assert match.group(1).lower() == frproto.codec.encode_frame(frproto.NegotiateRequest()).hex()


def test_worked_example_annotation_covers_every_byte() -> None:
    frame = frproto.codec.encode_frame(frproto.NegotiateRequest())
    rows = table_rows(section("11. Worked example"))
    annotated = "".join(
        r[0].replace(" ", "") for r in rows if len(r) >= 4 and re.fullmatch(r"[0-9a-f ]+", r[0])
    )
    assert annotated == frame.hex()


def test_digest_examples() -> None:
    zero = re.search(r"digest of 4096 zero bytes is `([0-9a-f]{32})`", DOC)
    assert zero
    assert zero.group(1) == frproto.codec.zero_digest(4096).hex()
    empty = re.search(r"`XXH3-128\(b\"\"\)` =\s*`([0-9a-f]{32})`", DOC)
    assert empty
    assert empty.group(1) == frproto.codec.AggregateDigest().digest().hex()

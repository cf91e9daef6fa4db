"""The requirement ids of docs/protocol.md, and the parser the conformance harness reads them
with (``frconform.requirements``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import frproto
from frconform.requirements import (
    DOCUMENT,
    LEVELS,
    PREFIXES,
    SUBJECTS,
    Requirement,
    load_requirements,
    parse_requirements,
    withdrawn_ids,
)

#: Prefixes this document must use; DEL (RelationshipDelete) is left to its own section.
REQUIRED_PREFIXES = sorted(set(PREFIXES) - {"DEL"})


@pytest.fixture(scope="module")
def requirements() -> dict[str, Requirement]:
    return load_requirements()


# -- The real document --------------------------------------------------------------------


def test_the_document_parses(requirements: dict[str, Requirement]) -> None:
    assert len(requirements) >= 80
    assert load_requirements(DOCUMENT) == requirements


def test_ids_are_well_formed_and_match_their_keys(requirements: dict[str, Requirement]) -> None:
    for key, req in requirements.items():
        assert key == req.id
        assert re.fullmatch(r"[A-Z]+-[1-9][0-9]*", req.id), req.id
        assert req.prefix in PREFIXES, f"{req.id}: prefix not in PREFIXES"


def test_ids_are_unique_in_the_text() -> None:
    marks = re.findall(r"\*\*\[([A-Za-z]+-[0-9]+)\]\*\*", DOCUMENT.read_text(encoding="utf-8"))
    duplicates = sorted({m for m in marks if marks.count(m) > 1})
    assert not duplicates


@pytest.mark.parametrize("prefix", REQUIRED_PREFIXES)
def test_every_prefix_is_used(requirements: dict[str, Requirement], prefix: str) -> None:
    assert any(r.prefix == prefix for r in requirements.values())


def test_every_sentence_has_exactly_one_subject(requirements: dict[str, Requirement]) -> None:
    for req in requirements.values():
        assert req.subject in SUBJECTS, req.id
        assert req.text.lower().startswith(f"a {req.subject}"), req.id
        others = [
            s
            for s in SUBJECTS
            if s != req.subject
            and s not in req.subject  # "recovery server" within "stand-alone recovery server"
            and re.match(rf"a {re.escape(req.subject)}\s*(,|and|or|/)\s*(an? )?{s}", req.text, re.I)
        ]
        assert not others, f"{req.id} names more than one subject"


def test_every_sentence_has_a_level(requirements: dict[str, Requirement]) -> None:
    for req in requirements.values():
        assert req.level in LEVELS, req.id
        assert re.search(rf"\b{req.level}\b", req.text), req.id


def test_sentences_are_one_line_and_named(requirements: dict[str, Requirement]) -> None:
    for req in requirements.values():
        assert "\n" not in req.text, req.id
        assert "|" not in req.text.replace("\\|", ""), req.id
        assert req.section, f"{req.id} is under no heading"


def test_sections_are_headings(requirements: dict[str, Requirement]) -> None:
    assert requirements["NEG-1"].section == "8. Negotiation and versioning"
    assert requirements["CHK-1"].section.startswith("4.13.3")
    assert requirements["REP-1"].section == "10.1 The recovery side's duties"


def test_table_requirements_end_at_their_cell(requirements: dict[str, Requirement]) -> None:
    # SES-4 is a table row whose error column is UNEXPECTED_MESSAGE.
    ses4 = requirements["SES-4"]
    assert ses4.text.endswith("with `UNEXPECTED_MESSAGE`.")
    assert "IRBegin, IREnd, BatchBegin, BatchEnd, Ack, DigestMapRequest |" not in ses4.text


def test_errors_are_named_by_their_code_name(requirements: dict[str, Requirement]) -> None:
    names = {c.name for c in frproto.ErrorCode}
    answers = {e.name for e in frproto.ExistingVM}  # a broker answers "with `EXISTING`"
    named = 0
    for req in requirements.values():
        for word in re.findall(r"(?:with|status|Error) `([A-Z][A-Z_]*)`", req.text):
            assert word in names | answers, f"{req.id}: {word} is not an ErrorCode name"
            named += word in names
    assert named >= 80


# -- The parser ---------------------------------------------------------------------------

_SAMPLE = """\
# A document

## 1. Things

* **[ABC-1]** A receiver MUST refuse a thing with `BAD_VALUE`.
* **[ABC-2]** A stand-alone recovery server SHOULD NOT do that.

```
* **[ABC-9]** inside a code block: not a requirement
```

### 1.1 A table

| Check | Error |
|---|---|
| **[XYZ-1]** A broker MUST NOT answer this. | `UNEXPECTED_MESSAGE` |
| a plain check (ABC-1) | `BAD_NAME` |

**[XYZ-2]** A primary MAY send it \\| or not.

* **[XYZ-3]** Withdrawn: it was wrong.
"""


def test_parser_reads_bullets_tables_and_paragraphs() -> None:
    found = parse_requirements(_SAMPLE)
    assert list(found) == ["ABC-1", "ABC-2", "XYZ-1", "XYZ-2"]
    assert found["ABC-1"] == Requirement(
        "ABC-1", "A receiver MUST refuse a thing with `BAD_VALUE`.", "MUST", "receiver", "1. Things"
    )
    assert found["ABC-2"].subject == "stand-alone recovery server"
    assert found["ABC-2"].level == "SHOULD NOT"
    assert found["XYZ-1"].text == "A broker MUST NOT answer this."
    assert found["XYZ-1"].level == "MUST NOT"
    assert found["XYZ-1"].section == "1.1 A table"
    assert found["XYZ-2"].level == "MAY"
    assert withdrawn_ids(_SAMPLE) == ["XYZ-3"]


def test_parser_rejects_a_duplicate_id() -> None:
    doc = "# T\n\n* **[ABC-1]** A receiver MUST a.\n* **[ABC-1]** A sender MUST b.\n"
    with pytest.raises(ValueError, match=r"line 4: duplicate requirement id ABC-1"):
        parse_requirements(doc)


def test_parser_rejects_reuse_of_a_withdrawn_id() -> None:
    doc = "# T\n\n* **[ABC-1]** Withdrawn.\n| **[ABC-1]** A sender MUST b. | x |\n"
    with pytest.raises(ValueError, match="duplicate requirement id ABC-1"):
        parse_requirements(doc)


def test_parser_rejects_a_sentence_without_a_keyword() -> None:
    doc = "# T\n\n| **[ABC-1]** A receiver must refuse it (lower case). | `BAD_VALUE` |\n"
    with pytest.raises(ValueError, match=r"line 3 \(ABC-1\): no RFC 2119 keyword"):
        parse_requirements(doc)


@pytest.mark.parametrize(
    "sentence",
    [
        "The receiver MUST refuse it.",
        "A client MUST refuse it.",
        "MUST refuse it.",
        "A primary and a recovery side MUST agree.",
    ],
)
def test_parser_rejects_an_unknown_subject(sentence: str) -> None:
    with pytest.raises(ValueError, match=r"line 3 \(ABC-1\): the sentence"):
        parse_requirements(f"# T\n\n* **[ABC-1]** {sentence}\n")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("* **[abc-1]** A receiver MUST a.\n", "PREFIX-N"),
        ("* **[ABC-01]** A receiver MUST a.\n", "PREFIX-N"),
        ("# **[ABC-1]** A receiver MUST a.\n", "heading"),
        ("* so **[ABC-1]** A receiver MUST a.\n", "must start"),
        ("* **[ABC-1]** A receiver MUST a. **[ABC-2]** A sender MUST b.\n", "more than one"),
    ],
)
def test_parser_rejects_ids_out_of_place(doc: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_requirements(doc)


def test_load_requirements_from_a_path(tmp_path: Path) -> None:
    doc = tmp_path / "copy.md"
    doc.write_text(_SAMPLE, encoding="utf-8")
    assert list(load_requirements(doc)) == ["ABC-1", "ABC-2", "XYZ-1", "XYZ-2"]

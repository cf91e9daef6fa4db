"""The specification is self-contained (issue: an implementer has neither ``frproto/``
nor ``tests/``): it is published with its golden vectors (``frctl conform
--export-spec``), and the vectors are written in the document's own terms (section 12):
every field a message vector holds is a field of that message's table in section 4."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "protocol.md"
VECTORS = REPO / "tests" / "vectors"

#: Section 12.1's two exceptions to "by the name in its Field column".
_VERSION = {"version": {"version_major", "version_minor"}}
_CHUNK = {"disk_index", "offset", "length", "digest", "zero", "data"}


def _table_fields() -> dict[str, set[str]]:
    """Each message of section 4 -> the names in its layout table's "Field" column."""
    text = DOC.read_text()
    body = text[text.index("## 4. Messages") : text.index("## 5. Enumerations")]
    out: dict[str, set[str]] = {}
    for part in re.split(r"\n### 4\.\d+ ", body)[1:]:
        name = part.split(" ", 1)[0]
        names: set[str] = set()
        header: list[str] | None = None
        for line in part.splitlines():
            if not line.startswith("|"):
                header = None
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
                continue
            if "Field" in header and not set(cells[0]) <= {"-"}:
                field = cells[header.index("Field")].strip("`")
                if " = " not in field:  # a length prefix (name_len = n): implied by the value
                    names.add(field)
        out[name] = names
    return out


def test_every_vector_field_is_a_field_of_the_documents_tables() -> None:
    tables = _table_fields()
    for path in sorted((VECTORS / "messages").glob("*.json")):
        doc = json.loads(path.read_text())
        message = doc["message"]
        assert message in tables, f"{path.name}: no section 4 entry for {message}"
        for case in doc["cases"]:
            keys = set(case["fields"]) - {"type"}
            if message == "Chunk":
                assert keys == _CHUNK, (path.name, case["name"], keys)
                continue
            expected = set(tables[message])
            for key, parts in _VERSION.items():
                if parts <= expected:
                    expected = (expected - parts) | {key}
            assert keys == expected, (path.name, case["name"], keys ^ expected)


def test_the_document_names_no_source_file_as_its_authority() -> None:
    text = DOC.read_text()
    assert "which is the truth where the two disagree" not in text
    assert "It is self-contained" in text
    # The vector format is defined in the document itself, not in a README beside the
    # vectors.
    assert "### 12.1 `messages/<message>.json`" in text
    assert "### 12.2 `errors/<error>.json`" in text


@pytest.mark.parametrize("as_json", [False, True])
def test_export_spec_writes_the_document_and_every_vector(tmp_path: Path, as_json: bool) -> None:
    out = tmp_path / "spec"
    done = subprocess.run(
        [sys.executable, "-m", "frctl", "conform", "--export-spec", str(out)]
        + (["--json"] if as_json else []),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "protocol.md").read_bytes() == DOC.read_bytes()
    for kind in ("messages", "errors"):
        ours = sorted(p.name for p in (VECTORS / kind).glob("*.json"))
        theirs = sorted(p.name for p in (out / "vectors" / kind).glob("*.json"))
        assert ours == theirs
        assert ours
        for name in ours:
            assert (out / "vectors" / kind / name).read_bytes() == (
                VECTORS / kind / name
            ).read_bytes()
    if as_json:
        assert len(json.loads(done.stdout)["files"]) == 1 + sum(
            len(list((VECTORS / k).glob("*.json"))) for k in ("messages", "errors")
        )

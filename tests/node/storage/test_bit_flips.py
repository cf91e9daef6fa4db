"""Single-bit flips in every on-disk file kind of a replica are detected (``bit_flips.py``
says what each check is and what mends each kind). ``FRREP_FLIPS`` (default 200) sets the
sampled flips per kind; ``scripts/crashes --flips`` flips every bit of the first 4 KiB."""

from __future__ import annotations

import json
import os

from tests.node.storage import bit_flips

FLIPS = int(os.environ.get("FRREP_FLIPS", "200"))


def test_sampled_bit_flips_of_every_file_kind_are_detected() -> None:
    report = bit_flips.run_flips(FLIPS)
    assert sorted(report) == sorted(bit_flips.KINDS)
    for kind, got in report.items():
        assert got.flips == FLIPS or kind == "state", (kind, got.flips)
        assert not got.failures, f"{kind}: {json.dumps(got.failures[:5])}"

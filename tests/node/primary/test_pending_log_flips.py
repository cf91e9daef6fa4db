"""Single-bit flips in the first 4 KiB of a pending-log cycle file are detected: the
cycle is refused (``PendingLogCorrupt``, at open or while it is read), never sent as
other data. What mends it: the primary resynchronizes the VM by digests (a damaged cycle
is a pending change it can no longer send). ``FRREP_FLIPS`` sets the sampled flips
(default 2,000; ``all`` flips every bit)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from node.primary.pending_log import PendingLog, PendingLogCorrupt

SPAN = 4096
_FLIPS = os.environ.get("FRREP_FLIPS", "2000")


def _chunks() -> list[tuple[int, int, bytes]]:
    rng = random.Random(7)
    return [
        (0, 0, rng.randbytes(1500)),
        (1, 65536, rng.randbytes(700)),
        (0, 8192, rng.randbytes(3000)),
    ]


def _read(directory: Path) -> list[tuple[int, int, bytes]] | None:
    """The cycle's chunks as read back, or None if it was refused."""
    try:
        log = PendingLog(directory, max_bytes=1 << 30)
        if 5 not in {c.sequence for c in log.cycles() if c.intact}:
            return None
        return [(d, o, bytes(b)) for d, o, b in log.read_cycle(5)]
    except (PendingLogCorrupt, KeyError):
        return None


def test_every_sampled_flip_of_a_cycle_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = PendingLog(directory, max_bytes=1 << 30)
    log.append_cycle(5, 1_700_000_000_000, _chunks())
    path = log.path_of(5)
    raw = path.read_bytes()
    assert _read(directory) == _chunks()
    bits = min(SPAN, len(raw)) * 8
    chosen = range(bits) if _FLIPS == "all" else random.Random(1).sample(range(bits), int(_FLIPS))
    undetected = []
    for bit in chosen:
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        if _read(directory) is not None:
            undetected.append(bit)
    path.write_bytes(raw)
    assert not undetected, f"flips read back as a valid cycle: bits {undetected[:10]}"
    assert _read(directory) == _chunks()

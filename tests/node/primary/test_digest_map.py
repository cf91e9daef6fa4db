"""DigestMap: get/set, persistence, corruption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from node.primary.digest_map import UNKNOWN, DigestMap, DigestMapCorrupt


def _filled(size: int = 1000 * 4096 + 17, block_size: int = 4096) -> DigestMap:
    m = DigestMap(size, block_size)
    for b in range(0, m.block_count, 3):
        m.set(b, xxhash.xxh3_128_digest(b.to_bytes(8, "big")))
    return m


def test_geometry_and_unknown() -> None:
    m = DigestMap(10 * 4096 + 1, 4096)
    assert m.block_count == 11
    assert len(m.digests) == 11 * 16
    assert m.get(10) == UNKNOWN
    assert not m.is_known(10)
    m.set(10, b"x" * 16)
    assert m.get(10) == b"x" * 16
    assert m.is_known(10)
    assert m.known_count() == 1
    with pytest.raises(IndexError):
        m.get(11)
    with pytest.raises(ValueError, match="16 bytes"):
        m.set(0, b"short")
    with pytest.raises(ValueError, match="digests"):
        DigestMap(4096, 4096, bytearray(15))
    assert DigestMap(0, 4096).block_count == 0


def test_round_trip(tmp_path: Path) -> None:
    m = _filled()
    m.save(tmp_path / "d.map")
    n = DigestMap.load(tmp_path / "d.map")
    assert n == m
    assert (n.size, n.block_size, n.block_count) == (m.size, m.block_size, m.block_count)
    assert n.get(3) == m.get(3) != UNKNOWN
    n.forget([3])
    assert n.get(3) == UNKNOWN
    assert os.listdir(tmp_path) == ["d.map"]


@pytest.mark.parametrize("where", ["magic", "header", "digest", "checksum", "truncate"])
def test_corruption_detected(tmp_path: Path, where: str) -> None:
    path = tmp_path / "d.map"
    _filled().save(path)
    raw = bytearray(path.read_bytes())
    if where == "truncate":
        del raw[-5:]
    else:
        index = {"magic": 0, "header": 20, "digest": 40 + 160, "checksum": len(raw) - 1}[where]
        raw[index] ^= 0x40
    path.write_bytes(raw)
    with pytest.raises(DigestMapCorrupt):
        DigestMap.load(path)


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "d.map"
    DigestMap(4096, 4096).save(path)
    m = _filled()
    m.save(path)
    assert DigestMap.load(path) == m

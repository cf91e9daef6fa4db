"""scan_changes and read_blocks against real image files."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import xxhash

from node.primary.digest_map import DigestMap
from node.primary.disks import DiskResized
from node.primary.scan import MAX_READ, digest_image, read_blocks, scan_changes

BS = 65536


def _image(path: Path, size: int, seed: int = 1) -> bytearray:
    data = bytearray(random.Random(seed).randbytes(size))
    path.write_bytes(data)
    return data


def _map_of(data: bytes | bytearray, block_size: int) -> DigestMap:
    m = DigestMap(len(data), block_size)
    view = memoryview(data)
    for b in range(m.block_count):
        m.set(b, xxhash.xxh3_128_digest(view[b * block_size : (b + 1) * block_size]))
    return m


def test_unknown_map_reports_every_block(tmp_path: Path) -> None:
    data = _image(tmp_path / "img", 5 * BS + 123)
    changed, digests = scan_changes(tmp_path / "img", DigestMap(len(data), BS))
    assert changed == list(range(6))
    assert digests[5] == xxhash.xxh3_128_digest(data[5 * BS :])  # last partial block


def test_unchanged_image_reports_nothing(tmp_path: Path) -> None:
    data = _image(tmp_path / "img", 40 * BS + 999)
    assert scan_changes(tmp_path / "img", _map_of(data, BS)) == ([], {})


@pytest.mark.parametrize("buffer_size", [BS, 3 * BS, 8 * 1024 * 1024])
def test_random_writes_found_exactly(tmp_path: Path, buffer_size: int) -> None:
    size = 150 * BS + 4321
    path = tmp_path / "img"
    data = _image(path, size)
    dmap = _map_of(data, BS)
    rng = random.Random(7)
    expected: set[int] = set()
    with open(path, "r+b") as f:
        for _ in range(40):
            offset = rng.randrange(size)
            length = min(rng.randrange(1, 3 * BS), size - offset)
            f.seek(offset)
            f.write(rng.randbytes(length))
            expected.update(range(offset // BS, (offset + length - 1) // BS + 1))
        f.seek(size - 1)  # the last byte, in the partial block
        f.write(b"\xaa" if data[-1] != 0xAA else b"\xbb")
        expected.add(size // BS)
    new = path.read_bytes()
    changed, digests = scan_changes(path, dmap, buffer_size=buffer_size)
    assert changed == sorted(expected)
    for b in changed:
        assert digests[b] == xxhash.xxh3_128_digest(new[b * BS : (b + 1) * BS])
    for b, d in digests.items():  # the caller records them after the ack
        dmap.set(b, d)
    assert scan_changes(path, dmap) == ([], {})


@pytest.mark.parametrize(("read_size", "ahead"), [(BS, 1), (3 * BS, 2), (8 * 1024 * 1024, 3)])
async def test_digest_image_equals_the_map_of_its_bytes(
    tmp_path: Path, read_size: int, ahead: int
) -> None:
    # Reads overlapped with hashing: every block lands at its own index, whatever the
    # read size and number of buffers in flight (the last block partial).
    size = 70 * BS + 777
    path = tmp_path / "img"
    data = _image(path, size + BS)  # bytes past the disk's size are ignored
    seen: list[int] = []
    dmap = await digest_image(
        path, size, BS, read_size=read_size, ahead=ahead, progress=seen.append
    )
    assert dmap == _map_of(data[:size], BS)
    assert seen == sorted(seen)
    assert seen[-1] == size


async def test_digest_image_refuses_a_shrunk_image(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"\x01" * (BS + 10))
    with pytest.raises(DiskResized, match="ends at"):
        await digest_image(path, 3 * BS, BS, read_size=BS)


def test_an_image_that_ends_before_its_disk_is_refused_not_read_as_zeros(
    tmp_path: Path,
) -> None:
    # A shrunk image padded with zeros would replicate zeros over the replica's data.
    path = tmp_path / "img"
    path.write_bytes(b"\x01" * (BS + 10))
    zeros_map = _map_of(b"\x01" * (BS + 10) + bytes(3 * BS - 10), BS)
    with pytest.raises(DiskResized, match="shrank"):
        scan_changes(path, zeros_map)
    with pytest.raises(DiskResized, match="ends at"):
        list(read_blocks(path, BS, [1, 2], 3 * BS))
    # What the image holds is still read, exactly.
    assert [bytes(d) for _, _, d in read_blocks(path, BS, [0], 3 * BS)] == [b"\x01" * BS]


def test_read_blocks_exact_data_and_coalescing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 200 * BS + 777
    path = tmp_path / "img"
    data = _image(path, size)
    blocks = [0, 1, 2, 5, *range(10, 150), 199, 200]
    preads: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        preads.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting)
    got = list(read_blocks(path, BS, blocks, size))
    monkeypatch.undo()
    assert [b for b, _, _ in got] == blocks
    for b, offset, view in got:  # views stay valid after the iterator moved on
        assert offset == b * BS
        assert isinstance(view, memoryview)
        assert view == data[offset : offset + BS]
    assert len(got[-1][2]) == 777  # the last block is cut at the disk's end
    # runs: [0-2], [5], [10..149] split at MAX_READ, [199-200]
    assert len(preads) == 3 + -(-140 * BS // MAX_READ)
    assert max(preads) == MAX_READ


def test_read_blocks_orders_dedupes_and_checks(tmp_path: Path) -> None:
    path = tmp_path / "img"
    data = _image(path, 10 * BS)
    got = [(b, bytes(v)) for b, _, v in read_blocks(path, BS, [7, 3, 3, 4], len(data))]
    assert got == [(b, bytes(data[b * BS : (b + 1) * BS])) for b in (3, 4, 7)]
    assert list(read_blocks(path, BS, [], len(data))) == []
    with pytest.raises(ValueError, match="outside"):
        read_blocks(path, BS, [10], len(data))
    with pytest.raises(ValueError, match="outside"):
        read_blocks(path, BS, [-1], len(data))


def test_scan_speed_information(tmp_path: Path) -> None:
    """Not an assertion: prints the scan rate of a hot 256 MiB image."""
    path = tmp_path / "big"
    pattern = random.Random(3).randbytes(1 << 20)
    with open(path, "wb") as f:
        for i in range(256):
            f.write(pattern[i:] + pattern[:i])
    dmap = DigestMap(256 << 20, BS)
    scan_changes(path, dmap)  # warm the page cache
    started = time.perf_counter()
    changed, _ = scan_changes(path, dmap)
    elapsed = time.perf_counter() - started
    assert len(changed) == 4096
    print(f"\nscan_changes: 256 MiB in {elapsed * 1000:.0f} ms = {0.25 / elapsed:.2f} GiB/s")

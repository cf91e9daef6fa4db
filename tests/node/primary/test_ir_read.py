"""The IR's read-ahead: every chunk once, in order, with its digest, from any start."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import xxhash

from node.primary.disks import DiskResized
from node.primary.ir_read import IRPiece, IRReadAhead

CHUNK = 64 * 1024


async def _collect(reader: IRReadAhead) -> list[tuple[int, int, bytes, bytes]]:
    got: list[tuple[int, int, bytes, bytes]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run)
        async with reader.reads:
            async for read in reader.reads:
                piece: IRPiece
                for piece in read.pieces:
                    got.append((piece.disk_index, piece.offset, bytes(piece.data), piece.digest))
                # The buffer is reused once given back: the copies above must stay right.
                reader.release(read)
    return got


@pytest.mark.parametrize(("read_size", "ahead"), [(CHUNK, 1), (3 * CHUNK, 2), (1 << 20, 3)])
async def test_every_chunk_once_in_order_with_its_digest(
    tmp_path: Path, read_size: int, ahead: int
) -> None:
    rng = random.Random(3)
    sizes = [10 * CHUNK + 123, 7 * CHUNK]
    images = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"d{i}.img"
        path.write_bytes(rng.randbytes(size + 999))  # bytes past the disk's size: not read
        images.append(path)
    start = (0, 2 * CHUNK)
    seen: list[tuple[int, int, bytes]] = []
    reader = IRReadAhead(
        images,
        sizes,
        start,
        chunk=CHUNK,
        on_block=lambda d, o, data: seen.append((d, o, bytes(data))),
        read_size=read_size,
        ahead=ahead,
    )
    got = await _collect(reader)
    assert reader.error is None
    expected = []
    for d, (path, size) in enumerate(zip(images, sizes, strict=True)):
        data = path.read_bytes()[:size]
        first = start[1] if d == start[0] else 0
        for offset in range(first, size, CHUNK):
            piece = data[offset : offset + CHUNK]
            expected.append((d, offset, piece, xxhash.xxh3_128_digest(piece)))
    assert got == expected
    assert seen == [(d, o, data) for d, o, data, _ in expected]


async def test_a_shrunk_image_ends_the_reads_with_the_error(tmp_path: Path) -> None:
    path = tmp_path / "d0.img"
    path.write_bytes(b"\x07" * (3 * CHUNK))
    reader = IRReadAhead([path], [8 * CHUNK], (0, 0), chunk=CHUNK, read_size=2 * CHUNK)
    got = await _collect(reader)
    assert [offset for _, offset, _, _ in got] == [0, CHUNK]  # the whole reads before it
    assert isinstance(reader.error, DiskResized)
    assert "shrank during the IR" in str(reader.error)

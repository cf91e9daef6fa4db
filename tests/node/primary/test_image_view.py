"""Reading a disk through a view (node/primary/image_view.py): the same answers as the
file, in worker threads too, and only inside the block that installed it."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from node.primary.digest_map import DigestMap
from node.primary.disks import image_size
from node.primary.image_view import view_of, viewing
from node.primary.scan import read_blocks, scan_changes


class BytesView:
    """A disk held in memory, counting its reads."""

    def __init__(self, data: bytes) -> None:
        self.data, self.reads = data, 0

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        self.reads += 1
        return self.data[offset : offset + length]


async def test_a_view_answers_for_its_path_as_the_file_would(tmp_path: Path) -> None:
    rng = random.Random(1)
    data = rng.randbytes(5 * 65536 + 1000)
    image = tmp_path / "disk.img"
    image.write_bytes(b"stale" * 10)  # the file is not what is read
    view = BytesView(data)
    dmap = DigestMap(len(data), 65536)
    with viewing({str(image): view}):
        assert image_size("disk0", image) == len(data)
        changed, digests = await trio.to_thread.run_sync(scan_changes, image, dmap)
        blocks = await trio.to_thread.run_sync(
            lambda: [
                (b, o, bytes(d)) for b, o, d in read_blocks(image, 65536, [1, 2, 5], len(data))
            ]
        )
    assert changed == list(range(6))
    assert len(digests) == 6
    assert blocks == [
        (1, 65536, data[65536:131072]),
        (2, 131072, data[131072:196608]),
        (5, 5 * 65536, data[5 * 65536 :]),
    ]
    assert view.reads >= 2
    # Outside the block, the file again.
    assert view_of(image) is None
    assert image_size("disk0", image) == 50

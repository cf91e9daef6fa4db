"""Deterministic workloads and the in-memory oracle for the storage tests.

Shared by the tests and by ``crash_worker.py`` (which runs in a subprocess), so both sides
derive the same batches and IR image from a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from uuid import UUID

from frproto import DiskInfo

VMID = UUID("6f1c2e34-5a4b-4c3d-9e8f-0123456789ab")
DISKS = (
    DiskInfo(disk_id="disk0", size=1 << 20),
    DiskInfo(disk_id="disk-1.b", size=(3 << 18) + 1000),
)
IR_SEQUENCE = 1
IR_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Range:
    disk_index: int
    offset: int
    length: int
    data: bytes | None  # None: a zero range


def batch(seed: int, sequence: int) -> list[Range]:
    """The ranges of delta batch ``sequence``: 2-10 ranges of 4-64 KiB over both disks,
    some zero, some overlapping, every disk touched."""
    rng = random.Random(f"batch:{seed}:{sequence}")
    out: list[Range] = []
    count = rng.randint(2, 10)
    for i in range(count):
        disk = i % len(DISKS) if i < len(DISKS) else rng.randrange(len(DISKS))
        size = DISKS[disk].size
        length = rng.choice((4096, 8192, 16384, 65536, rng.randint(1, 65536)))
        offset = rng.randrange(0, size, 512)
        length = min(length, size - offset)
        data = None if rng.random() < 0.15 else rng.randbytes(length)
        out.append(Range(disk, offset, length, data))
    return out


def apply(images: tuple[bytes, ...], ranges: list[Range]) -> tuple[bytes, ...]:
    """The images after ``ranges`` (in order, later ranges win)."""
    work = [bytearray(img) for img in images]
    for r in ranges:
        work[r.disk_index][r.offset : r.offset + r.length] = (
            r.data if r.data is not None else bytes(r.length)
        )
    return tuple(bytes(w) for w in work)


def ir_chunks(seed: int) -> list[Range]:
    """The IR of the test VM: 64 KiB chunks in disk order, about a third of them zero."""
    rng = random.Random(f"ir:{seed}")
    out: list[Range] = []
    for index, disk in enumerate(DISKS):
        for offset in range(0, disk.size, IR_CHUNK):
            length = min(IR_CHUNK, disk.size - offset)
            data = None if rng.random() < 0.35 else rng.randbytes(length)
            out.append(Range(index, offset, length, data))
    return out


def ir_image(seed: int) -> tuple[bytes, ...]:
    return apply(tuple(bytes(d.size) for d in DISKS), ir_chunks(seed))


def captured_at(sequence: int) -> int:
    return 1_700_000_000_000 + sequence * 1000


class Oracle:
    """Expected images by sequence: the IR image at ``IR_SEQUENCE``, then each batch.
    Keeps only the images from ``floor`` on (call :meth:`forget_below`)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._images: dict[int, tuple[bytes, ...]] = {IR_SEQUENCE: ir_image(seed)}
        self._top = IR_SEQUENCE

    def at(self, sequence: int) -> tuple[bytes, ...]:
        while self._top < sequence:
            nxt = self._top + 1
            self._images[nxt] = apply(self._images[self._top], batch(self.seed, nxt))
            self._top = nxt
        return self._images[sequence]

    def forget_below(self, floor: int) -> None:
        for seq in [s for s in self._images if s < floor]:
            del self._images[seq]

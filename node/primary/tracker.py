"""Change tracking for embedding hypervisor tools.

A hypervisor tool that knows which ranges a VM writes (a QEMU dirty bitmap, a write log,
a block-layer filter) reports them here; the replicator then sends exactly those blocks
and does not have to scan the disks. Without a tracker the replicator falls back to
:func:`node.primary.scan.scan_changes`.

The tracker keeps one bitmap per disk, one bit per block. It is thread-safe: the tool may
call :meth:`ChangeTracker.report_write` from any thread while the replicator takes the
dirty set in another. The protocol of a cycle is::

    changed = tracker.take()          # start of the cycle: dirty set handed over, cleared
    try:
        ...read, send, wait for the ack...
    except Exception:
        tracker.restore(changed)      # failed: the blocks are dirty again
        raise

**What the library expects of the tool.** A write must be reported before the cycle that
should carry it calls :meth:`take` (report it when the guest's write completes, or
before). :meth:`take` plus the read of the blocks must see the disks at one instant: the
tool pauses the VM (or gives a snapshot) around the capture window.

**Persistence.** :meth:`save` writes the bitmaps atomically (compact: one bit per block,
so 2 MiB for 1 TiB at 64 KiB blocks); :meth:`load` reads them back. A tool that cannot
vouch for its tracking (the process crashed without saving, the file is missing or
corrupt, writes happened while nobody tracked) marks the tracker *lost*
(:meth:`mark_lost`, or :meth:`load_or_lost`): the dirty set is then incomplete and the
replicator must resynchronize (compare digests with the recovery server) instead of
trusting it.

File format (integers big-endian)::

    magic        4s   b"FRCT"
    version      u16  1
    flags        u16  bit 0: lost
    block_size   u32
    disk_count   u32
    disk sizes   u64 * disk_count
    bitmaps      ceil(blocks / 8) bytes per disk, in disk order; bit i of the bitmap is
                 bit (i % 8) (least significant first) of byte i // 8
    checksum     u64  XXH3-64 of everything before it
"""

from __future__ import annotations

import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

import xxhash

from .state import write_file_atomic

_MAGIC: Final = b"FRCT"
_VERSION: Final = 1
_FLAG_LOST: Final = 1
_HEADER: Final = struct.Struct(">4sHHII")
_SIZE: Final = struct.Struct(">Q")
_CHECKSUM: Final = struct.Struct(">Q")
_NONZERO: Final = re.compile(rb"[^\x00]+")
#: For each byte value, the bit positions set in it.
_BITS: Final[tuple[tuple[int, ...], ...]] = tuple(
    tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)
)


class TrackerCorrupt(ValueError):
    """A saved tracker file is not valid (bad magic, version, length or checksum)."""


class ChangeTracker:
    """Which blocks of each disk were written since the last :meth:`take`.

    Args:
        disk_sizes: the size in bytes of each disk, by disk index.
        block_size: the tracking granularity in bytes (the replication block size).
    """

    def __init__(self, disk_sizes: Sequence[int], block_size: int = 65536) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        if any(size < 0 for size in disk_sizes):
            raise ValueError("a disk size is negative")
        self.block_size = block_size
        self.disk_sizes: tuple[int, ...] = tuple(int(s) for s in disk_sizes)
        self.block_counts: tuple[int, ...] = tuple(
            -(-size // block_size) for size in self.disk_sizes
        )
        self._bitmaps = [bytearray(-(-count // 8)) for count in self.block_counts]
        self._lock = threading.Lock()
        self._lost = False

    # -- reporting ----------------------------------------------------------------------

    def report_write(self, disk_index: int, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` of a disk were written.

        Every block the range touches is marked, including partial blocks at either end.
        A zero ``length`` marks nothing (but is still checked).

        Raises:
            ValueError: unknown disk, negative values, or a range past the disk's end.
        """
        if not 0 <= disk_index < len(self.disk_sizes):
            raise ValueError(f"no disk {disk_index} (the VM has {len(self.disk_sizes)})")
        size = self.disk_sizes[disk_index]
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(
                f"range offset={offset} length={length} is outside disk {disk_index} "
                f"of {size} bytes"
            )
        if length == 0:
            return
        first = offset // self.block_size
        end = (offset + length - 1) // self.block_size + 1
        with self._lock:
            _set_range(self._bitmaps[disk_index], first, end)

    def mark_lost(self) -> None:
        """Declare the dirty set incomplete: the replicator must resynchronize."""
        with self._lock:
            self._lost = True

    def clear_lost(self) -> None:
        """After a resynchronization: the dirty set can be trusted again."""
        with self._lock:
            self._lost = False

    @property
    def lost(self) -> bool:
        """True when tracking was lost (:meth:`mark_lost`); see the module docs."""
        return self._lost

    # -- reading --------------------------------------------------------------------------

    def dirty_blocks(self) -> dict[int, list[int]]:
        """The dirty blocks, ``{disk_index: sorted block indices}``, without clearing.

        Disks with no dirty block are left out.
        """
        with self._lock:
            return {
                index: blocks
                for index, bitmap in enumerate(self._bitmaps)
                if (blocks := _blocks_of(bitmap))
            }

    def dirty_count(self) -> int:
        """How many blocks are dirty, over all disks."""
        with self._lock:
            return sum(int.from_bytes(b, "little").bit_count() for b in self._bitmaps)

    def take(self) -> dict[int, list[int]]:
        """Return the dirty blocks (as :meth:`dirty_blocks`) and clear them, atomically
        with respect to :meth:`report_write`: the start of a cycle."""
        with self._lock:
            old = self._bitmaps
            self._bitmaps = [bytearray(len(bitmap)) for bitmap in old]
        # enumerate outside the lock: report_write never waits for this
        return {index: blocks for index, bitmap in enumerate(old) if (blocks := _blocks_of(bitmap))}

    def restore(self, blocks: Mapping[int, Iterable[int]]) -> None:
        """Mark ``blocks`` (as returned by :meth:`take`) dirty again, after a failed cycle.

        Raises:
            ValueError: an unknown disk or a block past a disk's end (nothing is marked).
        """
        checked: list[tuple[int, list[int]]] = []
        for disk_index, indices in blocks.items():
            if not 0 <= disk_index < len(self.disk_sizes):
                raise ValueError(f"no disk {disk_index} (the VM has {len(self.disk_sizes)})")
            items = list(indices)
            count = self.block_counts[disk_index]
            if items and not (min(items) >= 0 and max(items) < count):
                raise ValueError(f"a block of disk {disk_index} is outside 0..{count - 1}")
            checked.append((disk_index, items))
        with self._lock:
            for disk_index, items in checked:
                bitmap = self._bitmaps[disk_index]
                for block in items:
                    bitmap[block >> 3] |= 1 << (block & 7)

    # -- persistence ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The file image described in the module docs."""
        with self._lock:
            flags = _FLAG_LOST if self._lost else 0
            parts = [_HEADER.pack(_MAGIC, _VERSION, flags, self.block_size, len(self._bitmaps))]
            parts += [_SIZE.pack(size) for size in self.disk_sizes]
            parts += [bytes(b) for b in self._bitmaps]
        body = b"".join(parts)
        return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChangeTracker:
        """Parse :meth:`to_bytes`; TrackerCorrupt if anything does not check."""
        if len(raw) < _HEADER.size + _CHECKSUM.size:
            raise TrackerCorrupt("tracker file too short")
        body, (checksum,) = raw[: -_CHECKSUM.size], _CHECKSUM.unpack(raw[-_CHECKSUM.size :])
        if xxhash.xxh3_64_intdigest(body) != checksum:
            raise TrackerCorrupt("tracker file checksum mismatch")
        magic, version, flags, block_size, disk_count = _HEADER.unpack_from(body)
        if magic != _MAGIC or version != _VERSION or block_size == 0:
            raise TrackerCorrupt("not a tracker file of a known version")
        pos = _HEADER.size
        if len(body) < pos + disk_count * _SIZE.size:
            raise TrackerCorrupt("tracker file truncated")
        sizes = [_SIZE.unpack_from(body, pos + i * _SIZE.size)[0] for i in range(disk_count)]
        pos += disk_count * _SIZE.size
        tracker = cls(sizes, block_size)
        for index, bitmap in enumerate(tracker._bitmaps):
            chunk = body[pos : pos + len(bitmap)]
            if len(chunk) != len(bitmap):
                raise TrackerCorrupt("tracker file truncated")
            bitmap[:] = chunk
            pos += len(bitmap)
            spare = tracker.block_counts[index] % 8
            if spare and bitmap[-1] >> spare:
                raise TrackerCorrupt(f"disk {index}: bits set past the disk's end")
        if pos != len(body):
            raise TrackerCorrupt("trailing bytes in tracker file")
        tracker._lost = bool(flags & _FLAG_LOST)
        return tracker

    def save(self, path: Path) -> None:
        """Write the tracker to ``path`` atomically (temp file, fsync, rename, dir fsync)."""
        write_file_atomic(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> ChangeTracker:
        """Read a tracker saved by :meth:`save`.

        Raises:
            FileNotFoundError: no file.
            TrackerCorrupt: the file does not check.
        """
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def load_or_lost(
        cls, path: Path, disk_sizes: Sequence[int], block_size: int = 65536
    ) -> ChangeTracker:
        """Load ``path``; if it is missing, corrupt or describes other disks, return a
        fresh tracker for ``disk_sizes`` marked :attr:`lost`."""
        try:
            tracker = cls.load(path)
        except (OSError, TrackerCorrupt):
            tracker = None
        if (
            tracker is not None
            and tracker.disk_sizes == tuple(disk_sizes)
            and tracker.block_size == block_size
        ):
            return tracker
        fresh = cls(disk_sizes, block_size)
        fresh.mark_lost()
        return fresh


def _set_range(bitmap: bytearray, first: int, end: int) -> None:
    """Set bits ``first`` .. ``end - 1``."""
    first_byte, last_byte = first >> 3, (end - 1) >> 3
    low = (0xFF << (first & 7)) & 0xFF
    high = 0xFF >> (7 - ((end - 1) & 7))
    if first_byte == last_byte:
        bitmap[first_byte] |= low & high
        return
    bitmap[first_byte] |= low
    if last_byte > first_byte + 1:
        bitmap[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bitmap[last_byte] |= high


def _blocks_of(bitmap: bytearray) -> list[int]:
    """The indices of the set bits, ascending (skips zero runs at C speed)."""
    blocks: list[int] = []
    bits = _BITS
    for match in _NONZERO.finditer(bitmap):
        start = match.start()
        for position, value in enumerate(match.group(), start):
            base = position << 3
            blocks.extend([base + bit for bit in bits[value]])
    return blocks

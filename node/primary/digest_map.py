"""Per-disk block digests of the last replicated state.

One XXH3-128 digest (16 bytes) per block, in one flat ``bytearray``; an all-zero entry
means *unknown* (never replicated, or forgotten), which a scan always counts as changed.
The map is what :func:`node.primary.scan.scan_changes` compares a disk with when no
change tracker is attached, and what a resynchronization compares with the recovery
server's digests.

A 1 TiB disk at 64 KiB blocks has 16 Mi blocks: a 256 MiB map.

File format (integers big-endian)::

    magic        4s   b"FRDM"
    version      u16  1
    reserved     u16  0
    block_size   u32
    reserved     u32  0
    size         u64  the disk's size in bytes
    block_count  u64  ceil(size / block_size)
    digests      16 * block_count bytes
    checksum     u64  XXH3-64 of everything before it
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

import xxhash

from .state import write_file_atomic

#: Bytes of one digest (XXH3-128).
DIGEST_SIZE: Final = 16
#: The digest of an unknown block.
UNKNOWN: Final = bytes(DIGEST_SIZE)

_MAGIC: Final = b"FRDM"
_VERSION: Final = 1
_HEADER: Final = struct.Struct(">4sHHIIQQ")
_CHECKSUM: Final = struct.Struct(">Q")


class DigestMapCorrupt(ValueError):
    """A saved digest map does not check (magic, version, sizes or checksum)."""


class DigestMap:
    """The digests of one disk's blocks.

    Args:
        size: the disk's size in bytes (the last block may be partial).
        block_size: bytes per block.
        digests: the initial digests (``16 * block_count`` bytes, used as is, not copied);
            None for all unknown.
    """

    def __init__(self, size: int, block_size: int, digests: bytearray | None = None) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        self.size = size
        self.block_size = block_size
        self.block_count = -(-size // block_size)
        if digests is None:
            digests = bytearray(self.block_count * DIGEST_SIZE)
        elif len(digests) != self.block_count * DIGEST_SIZE:
            raise ValueError(
                f"{len(digests)} bytes of digests for {self.block_count} blocks "
                f"(need {self.block_count * DIGEST_SIZE})"
            )
        #: The raw digests, 16 bytes per block; scans compare slices of it directly.
        self.digests = digests

    def _check(self, block: int) -> int:
        if not 0 <= block < self.block_count:
            raise IndexError(f"block {block} is outside 0..{self.block_count - 1}")
        return block * DIGEST_SIZE

    def get(self, block: int) -> bytes:
        """The digest of ``block`` (:data:`UNKNOWN` if unknown). IndexError if out of range."""
        start = self._check(block)
        return bytes(self.digests[start : start + DIGEST_SIZE])

    def set(self, block: int, digest: bytes) -> None:
        """Record the digest of ``block`` (pass :data:`UNKNOWN` to forget it)."""
        start = self._check(block)
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest is {DIGEST_SIZE} bytes, not {len(digest)}")
        self.digests[start : start + DIGEST_SIZE] = digest

    def is_known(self, block: int) -> bool:
        """Whether ``block`` has a digest."""
        start = self._check(block)
        return self.digests[start : start + DIGEST_SIZE] != UNKNOWN

    def forget(self, blocks: list[int] | None = None) -> None:
        """Mark ``blocks`` (or every block) unknown."""
        if blocks is None:
            self.digests[:] = bytes(len(self.digests))
            return
        for block in blocks:
            self.set(block, UNKNOWN)

    def known_count(self) -> int:
        """How many blocks have a digest."""
        view = memoryview(self.digests)
        return sum(
            1
            for start in range(0, len(view), DIGEST_SIZE)
            if view[start : start + DIGEST_SIZE] != UNKNOWN
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DigestMap):
            return NotImplemented
        return (self.size, self.block_size, self.digests) == (
            other.size,
            other.block_size,
            other.digests,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DigestMap(size={self.size}, block_size={self.block_size})"

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the map atomically (temp file, fsync, rename, dir fsync), no copy of the
        digests."""
        header = _HEADER.pack(_MAGIC, _VERSION, 0, self.block_size, 0, self.size, self.block_count)
        hasher = xxhash.xxh3_64(header)
        hasher.update(self.digests)
        write_file_atomic(Path(path), (header, self.digests, _CHECKSUM.pack(hasher.intdigest())))

    @classmethod
    def load(cls, path: Path) -> DigestMap:
        """Read a map saved by :meth:`save`.

        Raises:
            FileNotFoundError: no file.
            DigestMapCorrupt: the file does not check.
        """
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        if len(raw) < _HEADER.size + _CHECKSUM.size:
            raise DigestMapCorrupt(f"{path}: too short for a digest map")
        magic, version, _r1, block_size, _r2, size, count = _HEADER.unpack_from(raw)
        if magic != _MAGIC or version != _VERSION:
            raise DigestMapCorrupt(f"{path}: not a digest map of a known version")
        if block_size == 0 or count != -(-size // block_size):
            raise DigestMapCorrupt(f"{path}: inconsistent size and block size")
        body_end = _HEADER.size + count * DIGEST_SIZE
        if len(raw) != body_end + _CHECKSUM.size:
            raise DigestMapCorrupt(f"{path}: wrong length for {count} blocks")
        view = memoryview(raw)
        (checksum,) = _CHECKSUM.unpack_from(raw, body_end)
        if xxhash.xxh3_64_intdigest(view[:body_end]) != checksum:
            raise DigestMapCorrupt(f"{path}: checksum mismatch")
        view.release()
        del raw[body_end:]
        del raw[: _HEADER.size]
        return cls(size, block_size, raw)

"""Early write-back (node/writeback.py): the journal writer and the pending log ask for
it every few MiB as they append, over contiguous ranges, and the files read back whole."""

from __future__ import annotations

import os
from pathlib import Path

from node.primary.durable import OSFiles, using
from node.primary.pending_log import PendingLog
from node.storage.fileio import FileIO
from node.storage.journal import JOURNAL_MAGIC, WRITEBACK_BYTES, FileWriter, read_file
from node.writeback import start_writeback

MiB = 1 << 20


class _Noting(FileIO):
    def __init__(self) -> None:
        super().__init__(None)
        self.ranges: list[tuple[int, int]] = []

    def start_writeback(self, fd: int, offset: int, length: int, path: Path) -> None:
        self.ranges.append((offset, length))
        super().start_writeback(fd, offset, length, path)


class _NotingFiles(OSFiles):
    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def start_writeback(self, fd: int, offset: int, length: int, path: Path) -> None:
        self.ranges.append((offset, length))
        super().start_writeback(fd, offset, length, path)


def _contiguous_from_zero(ranges: list[tuple[int, int]]) -> bool:
    end = 0
    for offset, length in ranges:
        if offset != end or length <= 0:
            return False
        end += length
    return True


def test_start_writeback_changes_no_byte(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        start_writeback(fd, 0, len(data))
        start_writeback(fd, 0, 0)  # the whole file from 0 (sync_file_range's 0 length)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_the_journal_starts_write_back_every_few_mib(tmp_path: Path) -> None:
    io = _Noting()
    path = tmp_path / "j"
    writer = FileWriter(io, path, JOURNAL_MAGIC, 5, 4, 0)
    blocks = [os.urandom(64 * 1024) for _ in range(300)]  # ~18.8 MiB
    for i, block in enumerate(blocks):
        writer.add_data(0, i * len(block), block)
    writer.end()
    writer.sync()
    writer.close()
    total = writer.size
    assert len(io.ranges) == total // WRITEBACK_BYTES
    assert _contiguous_from_zero(io.ranges)
    assert all(length >= WRITEBACK_BYTES for _, length in io.ranges)
    contents = read_file(path, expect_magic=JOURNAL_MAGIC)
    assert contents.complete
    assert len(contents.records) == len(blocks)


def test_the_pending_log_starts_write_back_as_a_cycle_is_written(tmp_path: Path) -> None:
    files = _NotingFiles()
    blocks = [os.urandom(64 * 1024) for _ in range(300)]
    log = PendingLog(tmp_path / "pending", max_bytes=1 << 30)
    with using(files):
        log.append_cycle(1, 1_700_000_000_000, [(0, i * 65536, b) for i, b in enumerate(blocks)])
    assert len(files.ranges) >= (len(blocks) * 65536) // (8 * MiB)
    assert _contiguous_from_zero(files.ranges)
    assert [data for _, _, data in log.read_cycle(1)] == blocks

"""I/O errors at every call of the primary's durable writes (``node/primary/durable.py``):
EIO, ENOSPC and EDQUOT raised by the n-th call, for every n, through an enable, captures
into the pending log, acknowledgements (state saves) and drops. The error reaches the
caller as ``OSError`` (the replicator logs it and counts a failed cycle), nothing already
stored is lost or half written (no partial cycle file, no torn state), and the step done
again without the fault ends exactly right."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node.primary.durable import Buffer, OSFiles, using
from node.primary.pending_log import PendingLog
from node.primary.state import PrimaryStateStore
from tests.node.storage.crash_states import PRIMARY_VMID, _primary_state, primary_chunks

ERRNOS = (errno.EIO, errno.ENOSPC, errno.EDQUOT)


@dataclass
class FaultyFiles(OSFiles):
    """The real calls, the ``fail_at``-th of them failing with ``err``."""

    fail_at: int = 0
    err: int = errno.EIO
    calls: int = 0
    fired: bool = False
    kinds: set[str] = field(default_factory=set)

    def _hit(self, kind: str, path: Path) -> None:
        self.calls += 1
        self.kinds.add(kind)
        if self.calls == self.fail_at:
            self.fired = True
            raise OSError(self.err, os.strerror(self.err), str(path))

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._hit("open", path)
        return super().open(path, flags, mode)

    def writev(self, fd: int, parts: list[Buffer], path: Path) -> None:
        self._hit("writev", path)
        super().writev(fd, parts, path)

    def truncate(self, fd: int, size: int, path: Path) -> None:
        self._hit("truncate", path)
        super().truncate(fd, size, path)

    def fsync(self, fd: int, path: Path) -> None:
        self._hit("fsync", path)
        super().fsync(fd, path)

    def fsync_dir(self, path: Path) -> None:
        self._hit("fsync_dir", path)
        super().fsync_dir(path)

    def rename(self, src: Path, dst: Path) -> None:
        self._hit("rename", dst)
        super().rename(src, dst)

    def unlink(self, path: Path, *, missing_ok: bool = True) -> None:
        self._hit("unlink", path)
        super().unlink(path, missing_ok=missing_ok)

    def mkdir(self, path: Path, *, exist_ok: bool = False) -> None:
        self._hit("mkdir", path)
        super().mkdir(path, exist_ok=exist_ok)


def _workload(root: Path, files: FaultyFiles) -> list[OSError]:
    """Enable, three cycles captured and acknowledged (the last two at once); each step
    once more after a fault."""
    errors: list[OSError] = []

    def step(fn: object) -> None:
        assert callable(fn)
        failed: OSError | None = None
        try:
            fn()
        except OSError as exc:
            failed = exc
        if failed is None:
            return
        assert files.fired, failed
        errors.append(failed)
        files.fail_at = 0
        fn()

    with using(files):
        stores: list[PrimaryStateStore] = []
        step(lambda: stores.append(PrimaryStateStore(root / "state")))
        states = stores[-1]
        state = _primary_state()
        step(lambda: states.save(state))
        pending = root / "pending"
        logs: list[PendingLog] = []
        step(lambda: logs.append(PendingLog(pending, max_bytes=1 << 24)))
        log = logs[0]
        for seq in (1, 2, 3):

            def capture(seq: int = seq) -> None:
                if seq not in {c.sequence for c in log.cycles()}:
                    log.append_cycle(seq, 1_700_000_000_000 + seq, primary_chunks(seq))

            step(capture)

            def ack(seq: int = seq) -> None:
                state.sequence = seq
                states.save(state)
                log.drop_through(seq)

            # Cycle 2 is acknowledged with 3: the one drop keeps a cycle's file as the
            # spare (which cycle 2 wrote over) and unlinks the other.
            if seq != 2:
                step(ack)
    return errors


def _check(root: Path) -> None:
    """What a restart finds: the state at 3, no cycle left, no temporary file."""
    state = PrimaryStateStore(root / "state").load(PRIMARY_VMID)
    assert state.sequence == 3
    log = PendingLog(root / "pending", max_bytes=1 << 24)
    assert log.cycles() == []
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_fault_at_every_call_of_the_primary(tmp_path: Path) -> None:
    clean = FaultyFiles()
    _workload(tmp_path / "clean", clean)
    _check(tmp_path / "clean")
    total = clean.calls
    assert clean.kinds == {
        "open",
        "writev",
        "truncate",
        "fsync",
        "fsync_dir",
        "rename",
        "unlink",
        "mkdir",
    }
    assert total > 20
    for n in range(1, total + 1):
        files = FaultyFiles(fail_at=n, err=ERRNOS[n % 3])
        root = tmp_path / str(n)
        errors = _workload(root, files)
        assert files.fired, f"call {n} of {total} was never made"
        assert len(errors) == 1
        assert errors[0].errno == files.err
        _check(root)


def test_a_failed_capture_keeps_nothing(tmp_path: Path) -> None:
    """A cycle whose write fails is not in the log, on disk or after a reopen."""
    log = PendingLog(tmp_path, max_bytes=1 << 24)
    files = FaultyFiles(fail_at=2, err=errno.ENOSPC)  # the open, then the first write
    with using(files), pytest.raises(OSError, match="No space"):
        log.append_cycle(1, 1, primary_chunks(1))
    assert log.cycles() == []
    assert PendingLog(tmp_path, max_bytes=1 << 24).cycles() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []

"""Power loss: every disk state a power cut may leave of the storage engine's files, checked
after recovery (``crash_states.py`` has the workloads and the oracle; the layer is
:mod:`frtesting.powerloss`).

``FRREP_CRASH_SAMPLES`` (default 4) sets the sampled states per crash point of the
workloads too large to enumerate; ``scripts/crashes --states N`` is the long run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from frtesting.powerloss import CrashStates, RecordingFileIO
from node.primary import durable
from node.storage.fileio import FileIO
from tests.node.storage import crash_states as cs

SAMPLES = int(os.environ.get("FRREP_CRASH_SAMPLES", "4"))


def _report(tally: cs.Tally) -> str:
    return "\n".join(
        f"{f.what}\n  {f.description}\n  replay: {f.replay()}" for f in tally.failures[:5]
    )


# -- the layer itself ---------------------------------------------------------------------------
def _contents(crashes: CrashStates, point: int, tmp: Path, name: str) -> set[bytes | None]:
    """What ``name`` holds in every state of a crash before ``point``."""
    seen: set[bytes | None] = set()
    base = tmp / f"{name}-{point}"
    base.mkdir()
    for i, state in enumerate(crashes.states(point, exhaustive_up_to=10_000, samples=0, seed=0)):
        target = base / str(i)
        crashes.materialize(state, target)
        path = target / name
        seen.add(path.read_bytes() if path.exists() else None)
    return seen


def test_unsynced_writes_may_be_dropped_kept_or_torn(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"")
    io = RecordingFileIO(root, tmp_path / "snap")
    fd = io.open(root / "f", os.O_RDWR)
    io.pwrite(fd, b"a" * 1024, 0, root / "f")
    io.fsync(fd, root / "f")
    io.pwrite(fd, b"b" * 1024, 0, root / "f")
    os.close(fd)
    crashes = CrashStates(io)
    # before the sync completes: the first write dropped, kept or torn at one sector
    assert _contents(crashes, 1, tmp_path, "f") == {b"", b"a" * 1024, b"a" * 512}
    # after it: the first write is certain; the second may be dropped, kept or torn
    assert _contents(crashes, 3, tmp_path, "f") == {
        b"a" * 1024,
        b"b" * 1024,
        b"b" * 512 + b"a" * 512,
    }


def test_names_survive_only_a_directory_sync(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    io = RecordingFileIO(root, tmp_path / "snap")
    io.write_file_durably(root / "state", b"one")  # tmp, fsync, rename, fsync dir
    fd = io.open(root / "new", os.O_RDWR | os.O_CREAT)
    io.pwrite(fd, b"x", 0, root / "new")
    io.fsync(fd, root / "new")  # the file's data, not its name
    os.close(fd)
    io.rename(root / "state", root / "moved")
    crashes = CrashStates(io)
    end = len(crashes.ops)
    # the file synced but not its directory: it may be gone
    assert _contents(crashes, end, tmp_path, "new") == {None, b"x"}
    # the rename not synced: either name
    assert _contents(crashes, end, tmp_path, "moved") == {None, b"one"}
    assert _contents(crashes, end, tmp_path, "state") == {None, b"one"}
    # the durable replace: "state" holds "one" in every state before the rename
    rename_at = next(op.index for op in crashes.ops if op.kind == "rename")
    fsync_dir_at = next(op.index for op in crashes.ops if op.kind == "fsync_dir")
    assert _contents(crashes, fsync_dir_at + 1, tmp_path, "state") == {b"one"}
    assert _contents(crashes, rename_at, tmp_path, "state") == {None}


def test_a_write_past_the_layer_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    io = RecordingFileIO(root, tmp_path / "snap")
    fd = os.open(root / "sneaky", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(AssertionError, match="did not open"):
            io.pwrite(fd, b"x", 0, root / "sneaky")
    finally:
        os.close(fd)


def test_a_change_outside_the_root_is_recorded(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    io = RecordingFileIO(root, tmp_path / "snap")
    io.mkdir(tmp_path / "elsewhere")
    assert io.violations == [str(tmp_path / "elsewhere")]


# -- the engine under power loss ------------------------------------------------------------------
def test_every_crash_state_of_one_batch() -> None:
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["one-batch"], 1, tally, exhaustive_up_to=10**9, samples=0)
    assert not tally.failures, _report(tally)
    assert tally.states >= 500  # every state of every crash point (723 with seed 1)


def test_crash_states_of_ir_and_three_batches() -> None:
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["ir-3-batches"], 1, tally, exhaustive_up_to=64, samples=SAMPLES)
    assert not tally.failures, _report(tally)
    assert tally.crash_points >= 250
    assert tally.states >= 1000


def test_crash_states_of_a_failover_revert() -> None:
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["failover-revert"], 1, tally, exhaustive_up_to=256, samples=SAMPLES * 8)
    assert not tally.failures, _report(tally)
    assert tally.states >= 300


@pytest.mark.parametrize("name", ["failover-cancel", "failover-complete"])
def test_crash_states_of_a_failover_cancelled_or_completed(name: str) -> None:
    """Every power cut during a cancel or a complete: once it returned it is done; cut
    short, it is not begun or it finishes when run again (S9)."""
    tally = cs.Tally()
    cs.run(cs.WORKLOADS[name], 1, tally, exhaustive_up_to=256, samples=SAMPLES * 4)
    assert not tally.failures, _report(tally)
    assert tally.states >= 60  # 74 for a complete, more for a cancel (seed 1)


def test_crash_states_of_a_point_copy() -> None:
    """A test failover's copy that returned survives the power cut whole (it used to sync
    the images' data but no directory: the names could be lost, see _ForgetsCopyDirSyncs)."""
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["point-copy"], 1, tally, exhaustive_up_to=256, samples=SAMPLES * 8)
    assert not tally.failures, _report(tally)
    assert tally.states >= 300


def test_crash_states_of_the_primary() -> None:
    """The primary's files: enable, captures, acknowledgements, drops (P1-P3). Its
    directories used to be made without a sync of their parents: a VM enabled just
    before a power cut could lose its state (see the test below)."""
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["primary-cycles"], 1, tally, exhaustive_up_to=4096, samples=SAMPLES * 8)
    assert not tally.failures, _report(tally)
    assert tally.states >= 300


def test_the_oracle_finds_the_primary_directories_unsynced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def makedirs_unsynced(path: Path) -> None:
        for p in reversed([p for p in (path, *path.parents) if not p.exists()]):
            durable.files().mkdir(p, exist_ok=True)

    for module in ("node.primary.state", "node.primary.pending_log"):
        monkeypatch.setattr(f"{module}.makedirs", makedirs_unsynced)
    tally = cs.Tally()
    cs.run(cs.WORKLOADS["primary-cycles"], 1, tally, exhaustive_up_to=256, samples=8)
    assert any(f.what.startswith("P1") for f in tally.failures), _report(tally)


# -- the oracle catches what a power cut takes ----------------------------------------------------
class _ForgetsJournalSyncs(RecordingFileIO):
    """A recording of an engine that never syncs its journal (the fsync is done, but the
    model is told it was not: what a missing fsync would leave)."""

    __slots__ = ()

    def fsync(self, fd: int, path: Path) -> None:
        if path.suffix == ".jrnl":
            FileIO.fsync(self, fd, path)
            return
        super().fsync(fd, path)

    fdatasync = fsync


class _ForgetsStateSyncs(RecordingFileIO):
    __slots__ = ()

    def fsync(self, fd: int, path: Path) -> None:
        if path.name.startswith("state.json"):
            FileIO.fsync(self, fd, path)
            return
        super().fsync(fd, path)


class _ForgetsCopyDirSyncs(RecordingFileIO):
    """The point copy as it was: image data synced, no directory."""

    __slots__ = ()

    def fsync_dir(self, path: Path) -> None:
        if cs.COPIES in path.parts:
            FileIO.fsync_dir(self, path)
            return
        super().fsync_dir(path)


@pytest.mark.parametrize(
    ("layer", "workload"),
    [
        (_ForgetsJournalSyncs, "one-batch"),
        (_ForgetsStateSyncs, "one-batch"),
        (_ForgetsCopyDirSyncs, "point-copy"),
    ],
)
def test_the_oracle_finds_a_missing_sync(
    layer: type[RecordingFileIO], workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cs, "RecordingFileIO", layer)
    tally = cs.Tally()
    cs.run(cs.WORKLOADS[workload], 1, tally, exhaustive_up_to=64, samples=4)
    assert tally.failures, "a missing sync went unnoticed"
    assert all(
        f.what.startswith(("S1", "S2", "S4", "S5", "S8")) or "Error" in f.what
        for f in tally.failures
    )

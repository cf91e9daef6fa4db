"""Unit tests of the replica storage engine (real files in tmp_path)."""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import xxhash

import frproto
from frproto import DiskInfo, IRState
from node.storage import AlreadyApplied, RecoveryPoint, Replica, ReplicaStore, StorageFaults
from node.storage import journal as jn
from node.storage.layout import check_inside
from tests.node.storage import workload as wl

MiB = 1 << 20


def make(store: ReplicaStore, vmid: UUID | None = None) -> Replica:
    return store.create(
        vmid or wl.VMID,
        name="vm-1",
        config=b"<config/>",
        disks=wl.DISKS,
        primary="primary.example.com",
        trust_group="tg",
    )


def do_ir(replica: Replica, seed: int = 7) -> None:
    replica.begin_ir(wl.IR_SEQUENCE)
    for c in wl.ir_chunks(seed):
        replica.write_ir_chunk(c.disk_index, c.offset, c.data, length=c.length)
    replica.complete_ir(wl.IR_SEQUENCE)


def images(replica: Replica) -> tuple[bytes, ...]:
    return tuple(replica.image_path(i).read_bytes() for i in range(len(replica.disks)))


def apply_batch(replica: Replica, seed: int, seq: int) -> None:
    w = replica.begin_batch(seq, seq - 1, wl.captured_at(seq))
    for r in wl.batch(seed, seq):
        w.add(r.disk_index, r.offset, r.data, length=r.length)
    w.commit()


def ir_state(replica: Replica) -> IRState:
    """The state, unnarrowed (mypy keeps a property narrowed after an assert)."""
    return replica.ir_state


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplicaStore]:
    s = ReplicaStore(tmp_path / "root", keep_points=4)
    yield s
    s.close()


# -- lifecycle -------------------------------------------------------------------------


def test_create_open_exists_delete_tombstone(store: ReplicaStore, tmp_path: Path) -> None:
    assert not store.exists(wl.VMID)
    with pytest.raises(frproto.UnknownVM):
        store.open(wl.VMID)
    r = make(store)
    assert store.exists(wl.VMID)
    assert store.vmids() == [wl.VMID]
    assert r.name == "vm-1"
    assert r.primary == "primary.example.com"
    assert r.trust_group == "tg"
    assert r.disks == wl.DISKS
    assert r.generation == 1
    assert r.ir_state == IRState.NOT_STARTED
    assert r.applied_sequence == 0
    assert r.config_blob() == b"<config/>"
    assert store.open(wl.VMID) is r
    with pytest.raises(frproto.AlreadyExists):
        make(store)
    for i, d in enumerate(wl.DISKS):
        st = os.stat(r.image_path(i))
        assert st.st_size == d.size
        assert st.st_blocks == 0  # sparse: nothing written
    # a fresh store object reads the same durable state
    store.close()
    again = ReplicaStore(store.root)
    r2 = again.open(wl.VMID)
    assert r2.disks == wl.DISKS
    assert r2.config_blob() == b"<config/>"
    again.delete(wl.VMID)
    assert not again.exists(wl.VMID)
    assert again.is_deleted(wl.VMID)
    assert again.vmids() == []
    assert not (store.root / str(wl.VMID)).exists()
    with pytest.raises(frproto.UnknownVM, match="deleted"):
        again.open(wl.VMID)
    with pytest.raises(frproto.UnknownVM):
        again.delete(wl.VMID)
    # re-creating (an administrator re-enabling replication) clears the tombstone
    make(again)
    assert again.exists(wl.VMID)
    assert not again.is_deleted(wl.VMID)
    again.close()


def test_create_refuses_bad_disks(store: ReplicaStore) -> None:
    with pytest.raises(frproto.BadValue):
        store.create(
            uuid4(),
            name="x",
            config=b"",
            disks=[DiskInfo("a", 10), DiskInfo("a", 10)],
            primary="p",
            trust_group="t",
        )
    with pytest.raises(frproto.BadName):
        store.create(
            uuid4(),
            name="x",
            config=b"",
            disks=[DiskInfo("../x", 10)],
            primary="p",
            trust_group="t",
        )
    assert store.vmids() == []


def test_recover_removes_leftovers(store: ReplicaStore) -> None:
    r = make(store)
    do_ir(r)
    (store.root / ".staging" / "half-made").mkdir()
    (r.image_path(0).parent.parent / "state.json.tmp").write_bytes(b"junk")
    (r.image_path(0).parent.parent / "undo" / f"{99:020d}.undo").write_bytes(b"junk")
    log = store.recover()
    assert any("half-made" in line for line in log)
    assert not (r.image_path(0).parent.parent / "state.json.tmp").exists()
    assert os.listdir(r.image_path(0).parent.parent / "undo") == []


# -- path escape -----------------------------------------------------------------------


def test_symlinked_vm_dir_is_refused(store: ReplicaStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    other = ReplicaStore(outside)
    make(other)
    other.close()
    vmid = wl.VMID
    os.symlink(outside / str(vmid), store.root / str(vmid))
    with pytest.raises(frproto.InternalError, match="symlink"):
        store.open(vmid)
    with pytest.raises(frproto.InternalError):
        store.exists(vmid)
    with pytest.raises(frproto.InternalError):
        make(store)
    assert store.vmids() == []


def test_symlinked_image_is_refused(store: ReplicaStore, tmp_path: Path) -> None:
    r = make(store)
    path = r.image_path(1)
    store.close()
    target = tmp_path / "elsewhere.img"
    target.write_bytes(bytes(wl.DISKS[1].size))
    path.unlink()
    os.symlink(target, path)
    with pytest.raises(frproto.InternalError):
        ReplicaStore(store.root).open(wl.VMID)


def test_check_inside(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    assert check_inside(root, root / "a" / "b") == root / "a" / "b"
    with pytest.raises(frproto.InternalError):
        check_inside(root, root.parent / "x")
    with pytest.raises(frproto.InternalError):
        check_inside(root, root / ".." / "x")


# -- IR --------------------------------------------------------------------------------


def test_ir_write_checkpoint_complete_and_sparse(store: ReplicaStore) -> None:
    r = make(store)
    with pytest.raises(frproto.OutOfSequence):
        r.write_ir_chunk(0, 0, b"x")
    r.begin_ir(1)
    assert r.ir_state == IRState.IN_PROGRESS
    assert r.ir_sequence == 1
    # only zero ranges on disk 0: the image must stay sparse
    for off in range(0, MiB, 64 * 1024):
        r.write_ir_chunk(0, off, None, length=64 * 1024)
    r.write_ir_chunk(1, 4096, b"a" * 4096)
    with pytest.raises(frproto.ChunkOutOfRange):
        r.write_ir_chunk(1, wl.DISKS[1].size - 10, b"b" * 11)
    with pytest.raises(frproto.ChunkOutOfRange):
        r.write_ir_chunk(2, 0, b"b")
    r.checkpoint_ir(1, 8192)
    assert r.ir_cursor == (1, 8192)
    with pytest.raises(frproto.OutOfSequence):
        r.begin_batch(2, 1, 0)
    with pytest.raises(frproto.OutOfSequence):
        r.complete_ir(5)
    r.complete_ir(1)
    assert ir_state(r) == IRState.COMPLETE
    assert r.applied_sequence == 1
    assert [p.sequence for p in r.recovery_points()] == [1]
    assert os.stat(r.image_path(0)).st_blocks == 0
    assert os.stat(r.image_path(1)).st_blocks * 512 <= 64 * 1024
    assert r.read(1, 4000, 200) == bytes(96) + b"a" * 104
    with pytest.raises(frproto.AlreadyExists):
        r.begin_ir(1)
    store.close()
    r2 = ReplicaStore(store.root).open(wl.VMID)
    assert r2.ir_state == IRState.COMPLETE
    assert r2.applied_sequence == 1


def test_ir_resume_keeps_cursor_and_zeroes_old_data(store: ReplicaStore) -> None:
    r = make(store)
    r.begin_ir(3)
    r.write_ir_chunk(0, 0, b"\xff" * 65536)
    r.write_ir_chunk(0, 65536, b"\xee" * 65536)
    r.checkpoint_ir(0, 65536)
    store.close()
    # restart: the cursor survived, and a resumed zero range overwrites old data
    s2 = ReplicaStore(store.root)
    r2 = s2.open(wl.VMID)
    assert r2.ir_state == IRState.IN_PROGRESS
    assert r2.ir_cursor == (0, 65536)
    assert any("in progress" in line for line in s2.recover())
    r2.begin_ir(3)
    assert r2.ir_cursor == (0, 65536)
    r2.write_ir_chunk(0, 65536, None, length=65536)
    r2.complete_ir(3)
    assert r2.read(0, 0, 131072) == b"\xff" * 65536 + bytes(65536)
    s2.close()


def test_ir_restart_with_new_sequence_resets_cursor(store: ReplicaStore) -> None:
    r = make(store)
    r.begin_ir(1)
    r.write_ir_chunk(0, 0, b"x" * 100)
    r.checkpoint_ir(0, 100)
    r.begin_ir(2)
    assert r.ir_cursor == (0, 0)
    assert r.ir_sequence == 2


# -- batches ---------------------------------------------------------------------------


def test_batches_apply_across_two_disks(store: ReplicaStore) -> None:
    seed = 11
    r = make(store)
    do_ir(r, seed)
    oracle = wl.Oracle(seed)
    assert images(r) == oracle.at(1)
    for seq in range(2, 9):
        apply_batch(r, seed, seq)
        assert r.applied_sequence == seq
        assert images(r) == oracle.at(seq)
    assert os.listdir(r.image_path(0).parent.parent / "journal") == []


def test_already_applied_and_out_of_sequence(store: ReplicaStore) -> None:
    r = make(store)
    do_ir(r)
    apply_batch(r, 1, 2)
    with pytest.raises(AlreadyApplied) as info:
        r.begin_batch(2, 1, 0)
    assert info.value.applied_sequence == 2
    with pytest.raises(AlreadyApplied):
        r.begin_batch(1, 0, 0)
    with pytest.raises(frproto.OutOfSequence):
        r.begin_batch(4, 3, 0)  # gap: 3 never arrived
    w = r.begin_batch(3, 2, 0)
    with pytest.raises(frproto.ChunkOutOfRange):
        w.add(0, MiB - 1, b"xy")
    # a refused range aborts the batch: nothing applied, journal gone
    with pytest.raises(frproto.InternalError):
        w.commit()
    assert r.applied_sequence == 2
    assert os.listdir(r.image_path(0).parent.parent / "journal") == []


def test_abort_and_superseded_batch(store: ReplicaStore) -> None:
    r = make(store)
    do_ir(r)
    before = images(r)
    w = r.begin_batch(2, 1, 0)
    w.add(0, 0, b"z" * 5000)
    w.abort()
    w.abort()
    assert images(r) == before
    assert r.applied_sequence == 1
    w1 = r.begin_batch(2, 1, 0)
    w1.add(0, 0, b"z" * 5000)
    w2 = r.begin_batch(2, 1, 0)  # a resend after a dropped connection supersedes w1
    with pytest.raises(frproto.InternalError):
        w1.commit()
    w2.add(1, 10, b"q" * 10)
    w2.commit()
    assert r.read(1, 10, 10) == b"q" * 10
    assert r.read(0, 0, 4) == before[0][:4]


def test_recovery_points_kept_pruned_and_readable(store: ReplicaStore) -> None:
    seed = 5
    r = make(store)
    do_ir(r, seed)
    oracle = wl.Oracle(seed)
    undo_dir = r.image_path(0).parent.parent / "undo"
    for seq in range(2, 12):
        apply_batch(r, seed, seq)
        points = r.recovery_points()
        want = list(range(max(1, seq - 3), seq + 1))
        assert [p.sequence for p in points] == want
        assert sorted(os.listdir(undo_dir)) == [f"{s:020d}.undo" for s in want[1:]]
        assert all(isinstance(p, RecoveryPoint) for p in points)
        assert points[-1].captured_at_ms == wl.captured_at(seq)
        for p in points:
            for i, d in enumerate(wl.DISKS):
                assert r.read(i, 0, d.size, at_sequence=p.sequence) == oracle.at(p.sequence)[i]
        # partial, unaligned reads of an old point
        old = points[0].sequence
        assert r.read(1, 777, 70000, at_sequence=old) == oracle.at(old)[1][777:70777]
    with pytest.raises(frproto.OutOfSequence):
        r.read(0, 0, 10, at_sequence=2)
    # a restarted store reads old points from the undo files alone
    store.close()
    s2 = ReplicaStore(store.root, keep_points=4)
    r2 = s2.open(wl.VMID)
    for p in r2.recovery_points():
        assert r2.read(0, 0, MiB, at_sequence=p.sequence) == oracle.at(p.sequence)[0]
    s2.close()


@pytest.mark.parametrize("read_size", [4096, 3 * 65536 + 5, 4 * MiB])
def test_digests(store: ReplicaStore, monkeypatch: pytest.MonkeyPatch, read_size: int) -> None:
    # Runs of data blocks are read in pieces of up to DIGEST_READ: any piece size gives
    # the same digests, blocks in holes and blocks the data starts inside of included.
    monkeypatch.setattr("node.storage.images.DIGEST_READ", read_size)
    r = make(store)
    do_ir(r, 3)
    apply_batch(r, 3, 2)
    img = images(r)
    for disk, block in ((0, 4096), (1, 65536), (1, 100_000)):
        size = wl.DISKS[disk].size
        count = -(-size // block)
        got = r.digests(disk, 0, block, count + 3)
        want = b"".join(
            xxhash.xxh3_128_digest(img[disk][o : o + block]) for o in range(0, size, block)
        )
        assert got == want
    assert r.digests(0, 8192, 4096, 2) == b"".join(
        xxhash.xxh3_128_digest(img[0][o : o + 4096]) for o in (8192, 12288)
    )
    assert r.digests(0, MiB, 4096, 5) == b""


# -- faults ----------------------------------------------------------------------------


def _enospc_on(match: str, after: int = 0) -> StorageFaults:
    calls = [0]

    def before_write(path: Path, nbytes: int) -> None:
        if match in str(path):
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return StorageFaults(before_write=before_write)


@pytest.mark.parametrize(
    ("where", "after"),
    [(".jrnl", 3), (".jrnl", 0), (".undo", 2), (".img", 0), (".img", 3), ("state.json", 0)],
)
def test_enospc_leaves_replica_at_last_point(tmp_path: Path, where: str, after: int) -> None:
    seed = 9
    root = tmp_path / "root"
    with ReplicaStore(root, keep_points=4) as s:
        r = make(s)
        do_ir(r, seed)
        apply_batch(r, seed, 2)
    oracle = wl.Oracle(seed)
    faults = _enospc_on(where, after)
    with ReplicaStore(root, keep_points=4, faults=faults) as s:
        r = s.open(wl.VMID)
        with pytest.raises(frproto.NoSpace, match=r"\w+ .*No space"):
            apply_batch(r, seed, 3)
        assert r.applied_sequence == 2
        assert images(r) == oracle.at(2)
        vm_dir = r.image_path(0).parent.parent
        assert os.listdir(vm_dir / "journal") == []
        assert sorted(os.listdir(vm_dir / "undo")) == [f"{2:020d}.undo"]
        assert r.read(0, 0, MiB, at_sequence=1) == oracle.at(1)[0]
        faults.before_write = None
    # and the same batch goes through once there is space again
    with ReplicaStore(root, keep_points=4) as s:
        assert s.recover() == []
        r = s.open(wl.VMID)
        apply_batch(r, seed, 3)
        assert images(r) == oracle.at(3)


def test_eio_maps_to_internal_error(tmp_path: Path) -> None:
    def before_sync(path: Path) -> None:
        if path.name.endswith(".jrnl"):
            raise OSError(errno.EIO, "Input/output error", str(path))

    with ReplicaStore(tmp_path / "r", faults=StorageFaults(before_sync=before_sync)) as s:
        r = make(s)
        do_ir(r)
        w = r.begin_batch(2, 1, 0)
        w.add(0, 0, b"x" * 10)
        with pytest.raises(frproto.InternalError, match=r"commit journal .*jrnl"):
            w.commit()
        assert r.applied_sequence == 1


@pytest.mark.parametrize("fail", ["commit record", "journal fsync"])
def test_a_failed_commit_record_discards_the_batch_and_it_can_be_sent_again(
    tmp_path: Path, fail: str
) -> None:
    """The commit record's write or fsync fails: the batch was never acknowledged, so it
    is discarded (journal closed and gone) and the primary's resend of the same sequence
    goes through on the same open replica, without a restart."""
    seed = 5
    failing = [True]

    def before_write(path: Path, nbytes: int) -> None:
        # The commit record is the last write to the journal before its fsync: fail the
        # write that comes once every record of the batch is in.
        if fail == "commit record" and failing[0] and path.suffix == ".jrnl" and armed[0]:
            raise OSError(errno.EIO, "Input/output error", str(path))

    def before_sync(path: Path) -> None:
        # Only the fsync fails (this hook also runs before the discard's unlink).
        if fail == "journal fsync" and failing[0] and path.suffix == ".jrnl":
            failing[0] = False
            raise OSError(errno.EIO, "Input/output error", str(path))

    armed = [False]
    faults = StorageFaults(before_write=before_write, before_sync=before_sync)
    with ReplicaStore(tmp_path / "root", keep_points=4, faults=faults) as s:
        r = make(s)
        do_ir(r, seed)
        w = r.begin_batch(2, 1, wl.captured_at(2))
        for x in wl.batch(seed, 2):
            w.add(x.disk_index, x.offset, x.data, length=x.length)
        armed[0] = True
        with pytest.raises(frproto.InternalError, match=r"commit journal .*jrnl"):
            w.commit()
        assert r.applied_sequence == 1
        vm_dir = r.image_path(0).parent.parent
        assert os.listdir(vm_dir / "journal") == []
        failing[0] = False
        apply_batch(r, seed, 2)
        assert r.applied_sequence == 2
        assert images(r) == wl.Oracle(seed).at(2)
        assert os.listdir(vm_dir / "journal") == []


def test_failed_rollback_is_finished_by_recover(tmp_path: Path) -> None:
    """Images fail after the first write and keep failing: the rollback cannot run, the
    committed journal stays, and recover() rolls the batch forward."""
    seed = 4
    root = tmp_path / "root"
    faults = _enospc_on(".img", after=1000)
    with ReplicaStore(root, keep_points=3, faults=faults) as s:
        r = make(s)
        do_ir(r, seed)
        calls = [0]

        def fail_after_first_apply(path: Path, nbytes: int) -> None:
            if path.suffix == ".img":
                calls[0] += 1
                if calls[0] > len(wl.batch(seed, 2)) + 1:  # reservations, then one write
                    raise OSError(errno.EIO, "Input/output error", str(path))

        faults.before_write = fail_after_first_apply
        w = r.begin_batch(2, 1, 0)
        for x in wl.batch(seed, 2):
            w.add(x.disk_index, x.offset, x.data, length=x.length)
        with pytest.raises(frproto.InternalError):
            w.commit()
        assert r.applied_sequence == 1
    with ReplicaStore(root, keep_points=3) as s:
        log = s.recover()
        assert any("re-applied committed batch 2" in line for line in log)
        r = s.open(wl.VMID)
        assert r.applied_sequence == 2
        oracle = wl.Oracle(seed)
        assert images(r) == oracle.at(2)
        assert r.read(1, 0, wl.DISKS[1].size, at_sequence=1) == oracle.at(1)[1]


# -- journal format --------------------------------------------------------------------


def test_torn_journal_is_uncommitted(store: ReplicaStore) -> None:
    """Every truncation of a committed journal reads as not committed."""
    r = make(store)
    do_ir(r)
    path = r.image_path(0).parent.parent / "journal" / "probe.jrnl"
    from node.storage.fileio import FileIO

    w = jn.FileWriter(FileIO(None), path, jn.JOURNAL_MAGIC, 2, 1, 0)
    w.add_data(0, 0, b"a" * 300)
    w.add_zero(1, 512, 4096)
    w.add_data(1, 0, b"b" * 10)
    w.end()
    w.close()
    raw = path.read_bytes()
    full = jn.read_file(path, expect_magic=jn.JOURNAL_MAGIC)
    assert full.complete
    assert len(full.records) == 3
    rng = random.Random(1)
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        assert not jn.read_file(path, expect_magic=jn.JOURNAL_MAGIC).complete
    for _ in range(300):
        flipped = bytearray(raw)
        pos = rng.randrange(len(raw))
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(flipped)
        assert not jn.read_file(path, expect_magic=jn.JOURNAL_MAGIC).complete, pos
    path.unlink()


# -- write-path optimisations: sparse IR, spare journal/undo files ------------------------


def test_ir_reserves_data_chunks_but_zero_chunks_stay_holes(store: ReplicaStore) -> None:
    """IR data chunks are allocated (posix_fallocate) before they are written; zero chunks
    on a fresh image must still cost nothing: every one of them stays a hole."""
    seed = 11
    r = make(store)
    do_ir(r, seed)
    chunks = wl.ir_chunks(seed)
    for index in range(len(wl.DISKS)):
        fd = os.open(r.image_path(index), os.O_RDONLY)
        try:
            for c in chunks:
                if c.disk_index != index or c.data is not None:
                    continue
                try:
                    nxt = os.lseek(fd, c.offset, os.SEEK_DATA)
                except OSError as exc:  # ENXIO: no data after offset
                    if exc.errno != errno.ENXIO:
                        raise
                    nxt = wl.DISKS[index].size
                assert nxt >= c.offset + c.length, (index, c.offset)
        finally:
            os.close(fd)
        data = sum(c.length for c in chunks if c.disk_index == index and c.data is not None)
        assert os.stat(r.image_path(index)).st_blocks * 512 <= data + 64 * 1024
    assert images(r) == wl.ir_image(seed)


def test_spare_files_are_reused_and_stale_content_never_counts(tmp_path: Path) -> None:
    """Applied journals and pruned undo files become spares (at most two) that later
    batches write over; what a spare held before never reads as part of a new journal,
    and spares are removed when the replica is opened again."""
    seed = 12
    root = tmp_path / "root"
    oracle = wl.Oracle(seed)
    with ReplicaStore(root, keep_points=2) as s:
        r = make(s)
        do_ir(r, seed)
        vm_dir = r.image_path(0).parent.parent
        for seq in range(2, 7):
            apply_batch(r, seed, seq)
            spares = os.listdir(vm_dir / "spare")
            assert 1 <= len(spares) <= 2
            assert os.listdir(vm_dir / "journal") == []
            assert sorted(os.listdir(vm_dir / "undo")) == [f"{seq:020d}.undo"]
            assert r.read(0, 0, MiB, at_sequence=seq - 1) == oracle.at(seq - 1)[0]
        assert images(r) == oracle.at(6)
        # a new batch takes a spare (full of an older batch's complete records) as its
        # journal; a copy taken before the commit record must read as not committed
        before = len(os.listdir(vm_dir / "spare"))
        w = r.begin_batch(7, 6, wl.captured_at(7))
        assert len(os.listdir(vm_dir / "spare")) == before - 1
        ranges = wl.batch(seed, 7)
        w.add(ranges[0].disk_index, ranges[0].offset, ranges[0].data, length=ranges[0].length)
        jpath = vm_dir / "journal" / f"{7:020d}.jrnl"
        assert os.stat(jpath).st_size > jn.FILE_HEADER.size + jn.RECORD.size  # stale tail
        torn = jpath.read_bytes()
        assert not jn.read_file(jpath, expect_magic=jn.JOURNAL_MAGIC).complete
        w.abort()
        jpath.write_bytes(torn)
    with ReplicaStore(root, keep_points=2) as s:
        log = s.recover()
        assert any("discarded uncommitted batch 7" in line for line in log)
        r = s.open(wl.VMID)
        assert os.listdir(vm_dir / "spare") == []
        assert r.applied_sequence == 6
        assert images(r) == oracle.at(6)
        assert r.read(1, 0, wl.DISKS[1].size, at_sequence=5) == oracle.at(5)[1]
        apply_batch(r, seed, 7)
        assert images(r) == oracle.at(7)


def test_fail_over_brings_a_kept_point_back_even_across_a_crash(tmp_path: Path) -> None:
    crash_on = [-1]
    writes = [0]

    def before_write(path: Path, nbytes: int) -> None:
        if path.suffix == ".img":
            writes[0] += 1
            if writes[0] == crash_on[0]:
                raise OSError(errno.EIO, "simulated crash in the middle of the revert")

    store = ReplicaStore(tmp_path, faults=StorageFaults(before_write=before_write))
    r = make(store)
    do_ir(r)
    expected = {wl.IR_SEQUENCE: images(r)}
    for seq in range(2, 6):
        apply_batch(r, 9, seq)
        expected[seq] = images(r)
    generation = r.generation
    writes[0] = 0
    crash_on[0] = 3  # the third image write of the revert fails
    with pytest.raises(frproto.InternalError):
        r.fail_over(3)
    store.close()
    # A new process: the decision was durable, the revert finishes on the second call.
    again = ReplicaStore(tmp_path).open(wl.VMID)
    assert again.failed_over
    assert again.fail_over() == generation + 1  # the point decided first is kept
    assert again.applied_sequence == 3
    assert images(again) == expected[3]
    assert [p.sequence for p in again.recovery_points()][-1] == 3


def test_a_failover_reversed_cannot_be_cancelled_but_can_be_completed(tmp_path: Path) -> None:
    """Once reverse replication from the failed-over replica is set up, the other side
    holds the VM at the failover's generation: a cancel (which would hand the former
    primary its writes back) is refused, even with discard_writes, and changes nothing."""
    with ReplicaStore(tmp_path) as store:
        r = make(store)
        do_ir(r)
        for seq in range(2, 5):
            apply_batch(r, 9, seq)
        r.fail_over(3)
        at_three, generation = images(r), r.generation
        with pytest.raises(frproto.OutOfSequence):
            make(store, uuid4()).mark_reversed("b")  # not failed over: refused
        r.mark_reversed("a.example.com (127.0.0.3:7443)")
    with ReplicaStore(tmp_path) as store:  # the mark is durable
        r = store.open(wl.VMID)
        for discard in (False, True):
            with pytest.raises(frproto.OutOfSequence, match="reverse replication to a"):
                r.cancel_failover(discard_writes=discard)
        assert r.failed_over
        assert r.generation == generation
        assert images(r) == at_three
        assert r.complete_failover() == 3
        assert [p.sequence for p in r.recovery_points()] == [3]


def test_a_failover_not_reversed_is_still_cancelled(tmp_path: Path) -> None:
    """The mark is what refuses: without it the same cancel goes back to sequence 4."""
    with ReplicaStore(tmp_path) as store:
        r = make(store)
        do_ir(r)
        for seq in range(2, 5):
            apply_batch(r, 9, seq)
        at_four = images(r)
        r.fail_over(3)
        assert r.cancel_failover() == 4
        assert not r.failed_over
        assert images(r) == at_four


# -- the pipelined commit (acknowledged once the journal is durable, applied after) ------


def _durable_batch(replica: Replica, seed: int, seq: int) -> None:
    w = replica.begin_batch(seq, seq - 1, wl.captured_at(seq))
    for r in wl.batch(seed, seq):
        w.add(r.disk_index, r.offset, r.data, length=r.length)
    w.make_durable(b"\x01" * 16)


def test_an_acknowledged_batch_whose_apply_failed_is_applied_when_asked_again(
    tmp_path: Path,
) -> None:
    # Found by the simulation (scripts/simulate --seed 47, docs/simulation.md): the disk
    # filled between a batch's Ack and its apply; the apply failed and left the journal
    # for recovery. The next RelationshipOpen asks apply_committed for the sequence to
    # report (REP-12): it did nothing (no batch "committed" any more), the replica said
    # it was at the sequence before, and the primary, acknowledged further, halted for a
    # resynchronization a person had to start.
    full = [False]

    def before_write(path: Path, nbytes: int) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    store = ReplicaStore(tmp_path, keep_points=4, faults=StorageFaults(before_write=before_write))
    seed = 23
    oracle = wl.Oracle(seed)
    r = make(store)
    do_ir(r, seed)
    _durable_batch(r, seed, 2)  # acknowledged
    full[0] = True
    with pytest.raises(frproto.NoSpace):
        r.apply_committed()  # the server's apply after the Ack
    full[0] = False  # room again
    r.apply_committed()  # what the next connection's RelationshipOpen asks
    assert r.applied_sequence == 2
    assert images(r) == oracle.at(2)
    # Still full: the open is refused (NO_SPACE, the primary retries), never answered with
    # the sequence before the acknowledged batch.
    _durable_batch(r, seed, 3)
    full[0] = True
    with pytest.raises(frproto.NoSpace):
        r.apply_committed()
    with pytest.raises(frproto.NoSpace):
        r.apply_committed()
    full[0] = False
    r.apply_committed()
    assert r.applied_sequence == 3


def test_a_batch_made_durable_is_not_applied_until_asked_or_read(store: ReplicaStore) -> None:
    seed = 21
    oracle = wl.Oracle(seed)
    r = make(store)
    do_ir(r, seed)
    _durable_batch(r, seed, 2)
    # Acknowledged, not applied: the images and the points still say the IR...
    assert r.applied_sequence == wl.IR_SEQUENCE
    assert images(r) == oracle.at(wl.IR_SEQUENCE)
    assert [p.sequence for p in r.recovery_points()] == [wl.IR_SEQUENCE]
    # ...and the apply, whoever runs it, leaves the replica at the batch.
    r.apply_committed()
    assert r.applied_sequence == 2
    assert images(r) == oracle.at(2)
    assert r.applied_digest(2) == "01" * 16
    r.apply_committed()  # nothing left: no effect
    # A reader that comes before the apply applies it first: it never sees a half batch.
    _durable_batch(r, seed, 3)
    assert r.read(1, 0, wl.DISKS[1].size) == oracle.at(3)[1]
    assert r.applied_sequence == 3
    _durable_batch(r, seed, 4)
    d = r.digests(0, 0, 65536, 4)
    assert d == b"".join(
        xxhash.xxh3_128_digest(oracle.at(4)[0][i : i + 65536]) for i in range(0, 4 * 65536, 65536)
    )
    _durable_batch(r, seed, 5)
    _durable_batch(r, seed, 6)  # begin_batch applied 5 first
    assert [p.sequence for p in r.recovery_points()][-1] == 5
    assert r.read(0, 0, MiB, at_sequence=4) == oracle.at(4)[0][:MiB]
    assert r.read(0, 0, MiB, at_sequence=6) == oracle.at(6)[0][:MiB]


def test_a_crash_after_the_ack_and_before_the_apply_loses_nothing(tmp_path: Path) -> None:
    """The files as a crash between the acknowledgement and the apply leaves them (copied
    aside while the batch is durable and not applied): recovery replays the journal."""
    seed = 22
    oracle = wl.Oracle(seed)
    root = tmp_path / "root"
    with ReplicaStore(root, keep_points=4) as s:
        r = make(s)
        do_ir(r, seed)
        apply_batch(r, seed, 2)
        _durable_batch(r, seed, 3)
        assert r.applied_sequence == 2  # not applied yet
        assert images(r) == oracle.at(2)
        crashed = tmp_path / "crashed"
        shutil.copytree(root, crashed, symlinks=True)  # the disk at the crash
        r.apply_committed()
    with ReplicaStore(crashed, keep_points=4) as s:
        log = s.recover()
        assert any("re-applied committed batch 3" in line for line in log), log
        r = s.open(wl.VMID)
        assert r.applied_sequence == 3
        assert images(r) == oracle.at(3)
        assert r.read(0, 0, MiB, at_sequence=2) == oracle.at(2)[0][:MiB]
        assert os.listdir(r.layout.journal_dir) == []


@pytest.mark.parametrize("where", [".undo", ".img"])
def test_a_failed_apply_after_the_ack_rolls_forward(tmp_path: Path, where: str) -> None:
    """An acknowledged batch is never discarded: when its apply fails (ENOSPC on the undo
    file or the images after the reservation), the journal stays, and the next read or
    batch applies it once there is room."""
    seed = 23
    oracle = wl.Oracle(seed)
    root = tmp_path / "root"
    with ReplicaStore(root, keep_points=4) as s:
        r = make(s)
        do_ir(r, seed)
    faults = StorageFaults()
    with ReplicaStore(root, keep_points=4, faults=faults) as s:
        r = s.open(wl.VMID)
        _durable_batch(r, seed, 2)
        faults.before_write = _enospc_on(where).before_write
        with pytest.raises(frproto.NoSpace):
            r.apply_committed()
        assert r.applied_sequence == wl.IR_SEQUENCE
        assert os.listdir(r.layout.journal_dir) == [f"{2:020d}.jrnl"]  # kept
        with pytest.raises(frproto.NoSpace):
            r.read(0, 0, 10)  # still no room: no read of a half-applied batch
        faults.before_write = None
        assert r.read(0, 0, MiB) == oracle.at(2)[0][:MiB]
        assert r.applied_sequence == 2
        assert images(r) == oracle.at(2)
        apply_batch(r, seed, 3)
        assert images(r) == oracle.at(3)

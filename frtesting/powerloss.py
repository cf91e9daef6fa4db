"""A non-durable file layer: every disk state a power cut may leave of the storage engine's
files, in the spirit of FoundationDB's ``AsyncFileNonDurable`` and of ALICE/CrashMonkey.

A SIGKILL keeps the page cache, so a write that was never synced still reaches the disk; a
power cut does not. :class:`RecordingFileIO` stands in for the engine's
:class:`~node.storage.fileio.FileIO` seam: it does every system call for real (the
workload runs on real files, as in production) and records it, with its payload, in
:attr:`RecordingFileIO.ops`. :class:`CrashStates` then builds, for a crash before any
recorded operation, the disk states a power cut may leave, under this model (POSIX's,
stricter than ext4's ordered journal):

* a write, zero range, truncate or allocation of a file survives for certain only if an
  ``fsync``/``fdatasync`` of that file completed after it; otherwise it is dropped, kept,
  or (a write longer than a sector) torn: a prefix of whole 512-byte sectors survives;
* a create, mkdir, rename, unlink or tree removal survives for certain only if an
  ``fsync`` of its directory completed after it (for a rename, of either directory);
  otherwise it is undone or kept;
* the uncertain operations survive in any subset, independently of each other (writes
  reordered between syncs); what survives is replayed in the original order, so two
  overlapping uncertain writes that both survive leave the later one on top (a disk that
  reorders them so that the earlier lands last is not modelled).

An operation that cannot apply in a state (a write to a file whose create was undone, a
rename of a name that is not there) is skipped: the state is then the same as one where it
was undone too, which the model allows.

Files and directories are tracked by identity, not by name, so that a write through a
descriptor opened before a rename lands in the right file whatever survives of the rename.
A write through a descriptor the layer did not open (one opened with ``os.open`` past the
seam) is refused with ``AssertionError``: it would be invisible to the model. So is any
change outside the recorded root.

Workloads mark what the engine promised (``mark("ack", 3)``) between operations, so an
oracle knows what had been acknowledged before each crash point.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from node.storage.fileio import Buffer, FileIO

#: The sector size of a torn write: a power cut leaves whole sectors.
SECTOR: Final = 512

# Operation kinds. Data operations change a file's content or size; entry operations
# change a directory; sync operations make earlier ones durable; marks change nothing.
DATA_KINDS: Final = frozenset({"write", "zero", "truncate", "extend"})
ENTRY_KINDS: Final = frozenset({"create", "mkdir", "rename", "unlink", "rmtree"})
SYNC_KINDS: Final = frozenset({"fsync", "fsync_dir"})


@dataclass(frozen=True, slots=True)
class Op:
    """One recorded operation. ``obj`` is the file or directory it acts on (an identity:
    file ids and directory ids share one counter); ``parents`` the directories whose sync
    makes an entry operation durable; ``where``/``dest`` are (parent directory id, name)."""

    index: int
    kind: str
    obj: int = -1
    offset: int = 0
    size: int = 0
    data: bytes = b""
    where: tuple[int, str] = (-1, "")
    dest: tuple[int, str] = (-1, "")
    parents: tuple[int, ...] = ()
    mark: tuple[object, ...] = ()
    path: str = ""  # the name at the time, for messages

    @property
    def uncertain_choices(self) -> int:
        """How many ways this operation may survive when it is not yet durable."""
        if self.kind == "write" and len(self.data) > SECTOR:
            return 3  # dropped, kept, torn
        return 2  # dropped, kept


class RecordingFileIO(FileIO):
    """A :class:`FileIO` that records every change under ``root`` (see the module
    docstring). ``root`` must exist; what is in it when the layer is made is the
    durable starting state (copied to ``snapshot``)."""

    __slots__ = (
        "_dir_of",
        "_dirs",
        "_fds",
        "_files",
        "_lock",
        "_next",
        "_reentry",
        "ops",
        "root",
        "snapshot",
        "start_dirs",
        "start_files",
        "violations",
    )

    def __init__(self, root: Path, snapshot: Path) -> None:
        super().__init__(None)
        self.root = Path(root).resolve(strict=True)
        self.snapshot = Path(snapshot)
        shutil.copytree(self.root, self.snapshot, symlinks=True)
        self.ops: list[Op] = []
        #: Changes attempted outside ``root`` (the oracle wants none).
        self.violations: list[str] = []
        self._lock = threading.RLock()
        self._reentry = 0
        self._next = 1
        # name (relative to root) -> id, for what exists now
        self._files: dict[str, int] = {}
        self._dirs: dict[str, int] = {"": 0}
        # descriptor -> (file id, inode), so that a reused descriptor number is caught
        self._fds: dict[int, tuple[int, int]] = {}
        self._dir_of: dict[int, str] = {0: ""}
        for dirpath, dirnames, filenames in os.walk(self.root):
            base = os.path.relpath(dirpath, self.root)
            base = "" if base == "." else base
            for d in dirnames:
                self._dirs[os.path.join(base, d)] = self._new_id()
            for f in filenames:
                self._files[os.path.join(base, f)] = self._new_id()
        #: The identities of the starting state, for :class:`CrashStates`.
        self.start_files = dict(self._files)
        self.start_dirs = dict(self._dirs)

    # -- bookkeeping --------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _rel(self, path: Path | str) -> str | None:
        p = os.path.abspath(path)
        root = str(self.root)
        if p == root:
            return ""
        if not p.startswith(root + os.sep):
            self.violations.append(p)
            return None
        return p[len(root) + 1 :]

    def _where(self, rel: str) -> tuple[int, str]:
        parent, name = os.path.split(rel)
        return (self._dirs[parent], name)

    def _log(self, kind: str, **fields: object) -> None:
        self.ops.append(Op(len(self.ops), kind, **fields))  # type: ignore[arg-type]

    def _fid(self, fd: int, path: Path) -> int:
        entry = self._fds.get(fd)
        ino = os.fstat(fd).st_ino
        if entry is None or entry[1] != ino:
            raise AssertionError(
                f"write to {path} through a descriptor the power-loss layer did not open"
            )
        return entry[0]

    def mark(self, *what: object) -> None:
        """Record a promise of the workload (``"ack", 3``) at this point of the run."""
        with self._lock:
            self._log("mark", mark=tuple(what))

    # -- names ----------------------------------------------------------------------------
    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        with self._lock:
            rel = self._rel(path)
            existed = os.path.lexists(path)
            fd = super().open(path, flags, mode)
            if rel is None:
                return fd
            fid = self._files.get(rel)
            if fid is None:
                if existed:
                    os.close(fd)
                    raise AssertionError(f"{path} was made past the power-loss layer")
                fid = self._new_id()
                self._files[rel] = fid
                where = self._where(rel)
                self._log("create", obj=fid, where=where, parents=(where[0],), path=rel)
            elif flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
                self._log("truncate", obj=fid, size=0, path=rel)
            self._fds[fd] = (fid, os.fstat(fd).st_ino)
            return fd

    def mkdir(self, path: Path, *, exist_ok: bool = False) -> None:
        with self._lock:
            rel = self._rel(path)
            existed = os.path.isdir(path)
            super().mkdir(path, exist_ok=exist_ok)
            if rel is None or existed:
                return
            did = self._new_id()
            self._dirs[rel] = did
            self._dir_of[did] = rel
            where = self._where(rel)
            self._log("mkdir", obj=did, where=where, parents=(where[0],), path=rel)

    def _forget_under(self, rel: str) -> None:
        prefix = rel + os.sep
        for table in (self._files, self._dirs):
            for name in [n for n in table if n == rel or n.startswith(prefix)]:
                del table[name]

    def remove_tree(self, path: Path) -> None:
        with self._lock:
            rel = self._rel(path)
            did = self._dirs.get(rel) if rel is not None else None
            super().remove_tree(path)
            if rel is None or did is None:
                return
            where = self._where(rel)
            self._forget_under(rel)
            self._log("rmtree", obj=did, where=where, parents=(where[0],), path=rel)

    def rename(self, src: Path, dst: Path) -> None:
        with self._lock:
            s, d = self._rel(src), self._rel(dst)
            super().rename(src, dst)
            if s is None or d is None:
                return
            src_where, dst_where = self._where(s), self._where(d)
            if s in self._files:
                obj = self._files.pop(s)
                self._forget_under(d)
                self._files[d] = obj
            else:
                obj = self._dirs[s]
                prefix = s + os.sep
                moved = {
                    name: table
                    for table in (self._files, self._dirs)
                    for name in table
                    if name == s or name.startswith(prefix)
                }
                self._forget_under(d)
                for name, table in moved.items():
                    ident = table.pop(name)
                    table[d + name[len(s) :]] = ident
            self._log(
                "rename",
                obj=obj,
                where=src_where,
                dest=dst_where,
                parents=tuple({src_where[0], dst_where[0]}),
                path=f"{s} -> {d}",
            )

    def unlink(self, path: Path, *, missing_ok: bool = True) -> None:
        with self._lock:
            rel = self._rel(path)
            existed = os.path.lexists(path)
            super().unlink(path, missing_ok=missing_ok)
            if rel is None or not existed:
                return
            fid = self._files.pop(rel)
            where = self._where(rel)
            self._log("unlink", obj=fid, where=where, parents=(where[0],), path=rel)

    # -- data -----------------------------------------------------------------------------
    def pwrite(self, fd: int, data: Buffer, offset: int, path: Path) -> None:
        with self._lock:
            super().pwrite(fd, data, offset, path)
            if self._reentry or self._rel(path) is None:
                return
            self._log(
                "write", obj=self._fid(fd, path), offset=offset, data=bytes(data), path=str(path)
            )

    def writev(self, fd: int, parts: list[Buffer], path: Path) -> None:
        with self._lock:
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            super().writev(fd, parts, path)
            if self._rel(path) is None:
                return
            data = b"".join(bytes(p) for p in parts)
            self._log("write", obj=self._fid(fd, path), offset=pos, data=data, path=str(path))

    def write_zeros(self, fd: int, offset: int, length: int, path: Path) -> None:
        with self._lock:
            super().write_zeros(fd, offset, length, path)
            if length > 0 and self._rel(path) is not None:
                self._log(
                    "zero", obj=self._fid(fd, path), offset=offset, size=length, path=str(path)
                )

    def copy_range(
        self, src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, path: Path
    ) -> None:
        with self._lock:
            self._reentry += 1
            try:
                super().copy_range(src_fd, src_offset, dst_fd, dst_offset, length, path)
            finally:
                self._reentry -= 1
            if self._rel(path) is None:
                return
            data = os.pread(dst_fd, length, dst_offset)
            self._log(
                "write", obj=self._fid(dst_fd, path), offset=dst_offset, data=data, path=str(path)
            )

    def reserve(self, fd: int, offset: int, length: int, path: Path) -> None:
        with self._lock:
            super().reserve(fd, offset, length, path)
            if self._rel(path) is not None:
                self._log("extend", obj=self._fid(fd, path), size=offset + length, path=str(path))

    def truncate(self, fd: int, size: int, path: Path) -> None:
        with self._lock:
            super().truncate(fd, size, path)
            if self._rel(path) is not None:
                self._log("truncate", obj=self._fid(fd, path), size=size, path=str(path))

    # -- durability -----------------------------------------------------------------------
    def fsync(self, fd: int, path: Path) -> None:
        with self._lock:
            super().fsync(fd, path)
            if self._rel(path) is not None:
                self._log("fsync", obj=self._fid(fd, path), path=str(path))

    def fdatasync(self, fd: int, path: Path) -> None:
        with self._lock:
            super().fdatasync(fd, path)
            if self._rel(path) is not None:
                self._log("fsync", obj=self._fid(fd, path), path=str(path))

    def fsync_dir(self, path: Path) -> None:
        with self._lock:
            super().fsync_dir(path)
            rel = self._rel(path)
            if rel is not None:
                self._log("fsync_dir", obj=self._dirs[rel], path=rel)

    def crash(self, name: str) -> None:
        with self._lock:
            self._log("mark", mark=("crash_point", name))
        super().crash(name)


@dataclass(frozen=True, slots=True)
class CrashState:
    """One disk state a power cut before operation ``point`` may leave: ``choices[i]`` says
    what became of the i-th uncertain operation (0 dropped, 1 kept, 2 torn) and
    ``tears[i]`` how many bytes of a torn write survived."""

    point: int
    uncertain: tuple[int, ...]
    choices: tuple[int, ...]
    tears: tuple[int, ...]

    def describe(self, ops: list[Op]) -> str:
        words = {0: "dropped", 1: "kept", 2: "torn"}
        parts = []
        for i, c, t in zip(self.uncertain, self.choices, self.tears, strict=True):
            op = ops[i]
            extra = f" ({t} of {len(op.data)} bytes)" if c == 2 else ""
            parts.append(f"#{i} {op.kind} {op.path}: {words[c]}{extra}")
        return f"crash before op #{self.point}; " + ("; ".join(parts) or "nothing uncertain")


@dataclass
class CrashStates:
    """The crash states of one recorded run (see the module docstring)."""

    recording: RecordingFileIO
    ops: list[Op] = field(init=False)
    _start_content: dict[int, bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ops = list(self.recording.ops)
        syncs: dict[int, list[int]] = {}
        for op in self.ops:
            if op.kind in SYNC_KINDS:
                syncs.setdefault(op.obj, []).append(op.index)
        self._syncs = syncs

    @property
    def crash_points(self) -> range:
        """A crash before each operation, and one after the last."""
        return range(len(self.ops) + 1)

    def _durable(self, op: Op, point: int) -> bool:
        """Whether a sync completed before ``point`` makes ``op`` certain to survive."""
        owners = (op.obj,) if op.kind in DATA_KINDS else op.parents
        for owner in owners:
            if any(op.index < j < point for j in self._syncs.get(owner, ())):
                return True
        return False

    def uncertain(self, point: int) -> list[int]:
        """The operations before ``point`` that a power cut there may undo."""
        return [
            op.index
            for op in self.ops[:point]
            if op.kind in DATA_KINDS | ENTRY_KINDS and not self._durable(op, point)
        ]

    def _tear(self, op: Op, rng: random.Random | None) -> int:
        sectors = (len(op.data) - 1) // SECTOR
        if rng is None:
            return max(1, sectors // 2) * SECTOR
        return rng.randint(1, sectors) * SECTOR

    def states(
        self, point: int, *, exhaustive_up_to: int, samples: int, seed: int
    ) -> Iterator[CrashState]:
        """Every state of a crash before ``point`` when there are at most
        ``exhaustive_up_to`` of them; otherwise everything dropped, everything kept and
        ``samples`` seeded random states."""
        unc = tuple(self.uncertain(point))
        ranges = [range(self.ops[i].uncertain_choices) for i in unc]
        if self.state_count(point) <= exhaustive_up_to:
            for choices in itertools.product(*ranges):
                tears = tuple(
                    self._tear(self.ops[i], None) if c == 2 else 0
                    for i, c in zip(unc, choices, strict=True)
                )
                yield CrashState(point, unc, tuple(choices), tears)
            return
        rng = random.Random(f"{seed}:{point}")
        yield CrashState(point, unc, (0,) * len(unc), (0,) * len(unc))
        yield CrashState(point, unc, (1,) * len(unc), (0,) * len(unc))
        for _ in range(samples):
            choices = tuple(rng.randrange(len(r)) for r in ranges)
            tears = tuple(
                self._tear(self.ops[i], rng) if c == 2 else 0
                for i, c in zip(unc, choices, strict=True)
            )
            yield CrashState(point, unc, choices, tears)

    def state_count(self, point: int) -> int:
        """How many states a crash before ``point`` may leave."""
        total = 1
        for i in self.uncertain(point):
            total *= self.ops[i].uncertain_choices
        return total

    def marks(self, point: int) -> list[tuple[object, ...]]:
        """The workload's marks recorded before ``point``."""
        return [op.mark for op in self.ops[:point] if op.kind == "mark"]

    # -- building a state on disk -----------------------------------------------------------
    def _start(self) -> dict[int, bytes]:
        cached = self._start_content
        if cached is None:
            rec = self.recording
            cached = {
                ident: (rec.snapshot / name).read_bytes() for name, ident in rec.start_files.items()
            }
            self._start_content = cached
        return cached

    def materialize(self, state: CrashState, target: Path) -> None:
        """Write the disk state ``state`` under ``target`` (which must not exist)."""
        rec = self.recording
        fate = dict(zip(state.uncertain, zip(state.choices, state.tears, strict=True), strict=True))
        model = _Model()
        for name, ident in rec.start_dirs.items():
            if name:
                model.loc[ident] = _split(name, rec.start_dirs)
                model.dirs.add(ident)
        for name, ident in rec.start_files.items():
            model.loc[ident] = _split(name, rec.start_dirs)
        model.content = {ident: bytearray(data) for ident, data in self._start().items()}
        for op in self.ops[: state.point]:
            if op.kind in SYNC_KINDS or op.kind == "mark":
                continue
            choice, tear = fate.get(op.index, (1, 0))
            if choice == 0:
                continue
            model.apply(op, tear if choice == 2 else None)
        model.write(target)


def _split(rel: str, dirs: dict[str, int]) -> tuple[int, str]:
    parent, name = os.path.split(rel)
    return (dirs[parent], name)


@dataclass
class _Model:
    """A file system by identity, in memory: what survives is replayed here, then what is
    reachable from the root is written out. An object whose directory entry did not
    survive keeps its content (its inode) but is unreachable, as after a real crash."""

    loc: dict[int, tuple[int, str]] = field(default_factory=dict)
    dirs: set[int] = field(default_factory=lambda: {0})
    content: dict[int, bytearray] = field(default_factory=dict)

    def _evict(self, where: tuple[int, str], keep: int) -> None:
        for ident in [i for i, w in self.loc.items() if w == where and i != keep]:
            self._forget(ident)

    def _forget(self, ident: int) -> None:
        self.loc.pop(ident, None)
        if ident in self.dirs:
            for child in [i for i, w in self.loc.items() if w[0] == ident]:
                self._forget(child)

    def apply(self, op: Op, tear: int | None) -> None:
        kind = op.kind
        if kind == "create":
            self.content[op.obj] = bytearray()
            self._evict(op.where, op.obj)
            self.loc[op.obj] = op.where
        elif kind == "mkdir":
            self.dirs.add(op.obj)
            self._evict(op.where, op.obj)
            self.loc[op.obj] = op.where
        elif kind == "rename":
            # The object exists if its create survived (its directory entry may not have:
            # a durable rename out of an unsynced directory still names the inode).
            if op.obj in self.content or op.obj in self.dirs:
                self._evict(op.dest, op.obj)
                self.loc[op.obj] = op.dest
        elif kind in ("unlink", "rmtree"):
            self._forget(op.obj)
        else:
            data = self.content.get(op.obj)
            if data is None:
                return  # the file's create did not survive
            if kind == "write":
                payload = op.data if tear is None else op.data[:tear]
                end = op.offset + len(payload)
                if end > len(data):
                    data.extend(bytes(end - len(data)))
                data[op.offset : end] = payload
            elif kind == "zero":
                end = min(op.offset + op.size, len(data))
                if end > op.offset:
                    data[op.offset : end] = bytes(end - op.offset)
            elif kind == "truncate":
                if op.size < len(data):
                    del data[op.size :]
                else:
                    data.extend(bytes(op.size - len(data)))
            elif kind == "extend" and op.size > len(data):
                data.extend(bytes(op.size - len(data)))

    def _path(self, ident: int, root: Path) -> Path | None:
        parts: list[str] = []
        for _ in range(64):
            if ident == 0:
                return root.joinpath(*reversed(parts))
            where = self.loc.get(ident)
            if where is None or where[0] not in self.dirs:
                return None
            parts.append(where[1])
            ident = where[0]
        raise AssertionError("directory cycle")  # pragma: no cover - a bug of this module

    def write(self, root: Path) -> None:
        root.mkdir()
        for ident in sorted(self.dirs - {0}, key=lambda i: len(str(self._path(i, root) or ""))):
            path = self._path(ident, root)
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        for ident, data in self.content.items():
            path = self._path(ident, root)
            if path is not None and path.parent.is_dir():
                with open(path, "wb") as f:
                    f.write(data)


__all__ = ["SECTOR", "CrashState", "CrashStates", "Op", "RecordingFileIO"]

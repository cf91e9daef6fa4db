"""Where the replicas of one storage location are created, opened, deleted and recovered.

A :class:`ReplicaStore` is the recovery server's one handle on its storage root: it hands
out one shared :class:`~node.storage.replica.Replica` per VMID, and at startup
:meth:`ReplicaStore.recover` removes half-created and half-deleted replicas and lets each
replica finish what an interrupted commit left. Creating and deleting are atomic by
rename: a replica is built in ``.staging/`` and renamed into place, and renamed into
``.trash/`` before it is removed (``docs/storage.md``, *Create and delete*).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from uuid import UUID

import frproto
from frproto import DiskInfo

from . import layout as lay
from .fileio import FileIO, StorageFaults, mapped, open_flags
from .replica import Replica
from .state import ReplicaState


def too_large(disk: DiskInfo, limit: str) -> frproto.NoSpace:
    """The refusal of a disk the storage cannot hold (REP-23): its id, its size, why."""
    return frproto.NoSpace(
        f"disk {disk.disk_id!r} of {disk.size} bytes cannot be held here: it is larger than {limit}"
    )


class ReplicaStore:
    """Every replica under ``root`` (see :mod:`node.storage.layout`)."""

    def __init__(
        self,
        root: Path,
        *,
        keep_points: int = 24,
        faults: StorageFaults | None = None,
        io: FileIO | None = None,
    ) -> None:
        """``io`` replaces the engine's system calls (the power-loss tests record them);
        by default they are the real ones, with ``faults`` applied."""
        if keep_points < 1:
            raise ValueError("keep_points must be at least 1")
        root = Path(root)
        self._io = io if io is not None else FileIO(faults)
        with mapped("create storage root", root):
            root.mkdir(parents=True, exist_ok=True)
            self.root = root.resolve(strict=True)
            for sub in (lay.TOMBSTONES_DIR, lay.STAGING_DIR, lay.TRASH_DIR):
                path = lay.check_inside(self.root, self.root / sub)
                self._io.mkdir(path, exist_ok=True)
        self.keep_points = keep_points
        self._lock = threading.RLock()
        self._open: dict[UUID, Replica] = {}

    def __enter__(self) -> ReplicaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open replica (their descriptors)."""
        with self._lock:
            for replica in self._open.values():
                replica.close()
            self._open.clear()

    def _layout(self, vmid: UUID) -> lay.ReplicaLayout:
        if not isinstance(vmid, UUID):
            raise TypeError(f"vmid must be a UUID, not {type(vmid).__name__}")
        lo = lay.ReplicaLayout(self.root, vmid)
        lo.checked(lo.dir)
        return lo

    def exists(self, vmid: UUID) -> bool:
        """Whether the replica exists (``frproto.InternalError`` if its directory is a
        symlink or otherwise escapes the root)."""
        lo = self._layout(vmid)
        return os.path.isfile(lo.checked(lo.state))

    def is_deleted(self, vmid: UUID) -> bool:
        return os.path.lexists(lay.tombstone_path(self.root, vmid)) and not self.exists(vmid)

    def vmids(self) -> list[UUID]:
        with mapped("list storage root", self.root):
            names = os.listdir(self.root)
        out = []
        for name in sorted(names):
            vmid = lay.parse_vmid_dir(name)
            if vmid is not None and not os.path.islink(self.root / name) and self.exists(vmid):
                out.append(vmid)
        return out

    def create(
        self,
        vmid: UUID,
        *,
        name: str,
        config: bytes,
        disks: Sequence[DiskInfo],
        primary: str,
        trust_group: str,
    ) -> Replica:
        """Create a replica with sparse images of the disks' sizes; durable on return.
        Clears a tombstone left by an earlier delete of the same VMID."""
        with self._lock:
            lo = self._layout(vmid)
            if self.exists(vmid):
                raise frproto.AlreadyExists(f"replica {vmid} already exists")
            ids = [d.disk_id for d in disks]
            for disk in disks:
                lay.check_disk_id(disk.disk_id)
                if disk.size < 0:
                    raise frproto.BadValue(f"disk {disk.disk_id} has a negative size")
            if len(set(ids)) != len(ids):
                raise frproto.BadValue(f"duplicate disk ids in {ids}")
            self._check_room(disks)
            state = ReplicaState(
                vmid=vmid,
                name=name,
                disks=tuple(DiskInfo(disk_id=d.disk_id, size=d.size) for d in disks),
                primary=primary,
                trust_group=trust_group,
            )
            staging = self.root / lay.STAGING_DIR / f"{vmid}.{uuid.uuid4().hex}"
            lay.check_inside(self.root, staging)
            io = self._io
            try:
                with mapped("create replica", staging):
                    io.mkdir(staging)
                    sl = lay.ReplicaLayout(staging.parent, vmid)
                    for sub in (lay.DISKS_DIR, lay.JOURNAL_DIR, lay.UNDO_DIR):
                        io.mkdir(staging / sub)
                    self._write_new(staging / lay.CONFIG_FILE, config)
                    self._write_new(staging / lay.STATE_FILE, state.to_bytes())
                    for disk in state.disks:
                        path = staging / lay.DISKS_DIR / sl.image(disk.disk_id).name
                        fd = io.open(path, open_flags(write=True, create=True) | os.O_EXCL, 0o600)
                        try:
                            try:
                                io.truncate(fd, disk.size, path)
                            except OSError as exc:
                                if exc.errno in (errno.EFBIG, errno.EINVAL):
                                    # Past the file system's largest file (REP-23).
                                    raise too_large(disk, "the storage's largest file") from exc
                                raise
                            io.fsync(fd, path)
                        finally:
                            os.close(fd)
                    for sub in (lay.DISKS_DIR, lay.JOURNAL_DIR, lay.UNDO_DIR):
                        io.fsync_dir(staging / sub)
                    io.fsync_dir(staging)
                    io.fsync_dir(staging.parent)
                    io.rename(staging, lo.dir)
                    io.fsync_dir(self.root)
                    tomb = lay.tombstone_path(self.root, vmid)
                    if os.path.lexists(tomb):
                        io.unlink(tomb)
                        io.fsync_dir(tomb.parent)
            except BaseException:
                io.remove_tree(staging)
                raise
            return self._open_locked(vmid)

    def _check_room(self, disks: Sequence[DiskInfo]) -> None:
        """Refuse a disk this storage can never hold (docs/protocol.md REP-23): one larger
        than the whole file system of the storage location. Free space is not checked:
        images are sparse, and storage may be thinly provisioned (running out later is
        NO_SPACE at the write that finds it)."""
        with mapped("statvfs", self.root):
            vfs = os.statvfs(self.root)
        capacity = vfs.f_blocks * vfs.f_frsize
        for disk in disks:
            if disk.size > capacity:
                raise too_large(disk, "the storage location's file system")

    def _write_new(self, path: Path, data: bytes) -> None:
        fd = self._io.open(path, open_flags(write=True, create=True) | os.O_EXCL, 0o600)
        try:
            self._io.pwrite(fd, data, 0, path)
            self._io.fsync(fd, path)
        finally:
            os.close(fd)

    def open(self, vmid: UUID) -> Replica:
        """The replica (one shared instance per VMID); ``frproto.UnknownVM`` if absent."""
        with self._lock:
            return self._open_locked(vmid)

    def _open_locked(self, vmid: UUID) -> Replica:
        found = self._open.get(vmid)
        if found is not None:
            return found
        lo = self._layout(vmid)
        if not self.exists(vmid):
            deleted = " (deleted)" if self.is_deleted(vmid) else ""
            raise frproto.UnknownVM(f"no replica {vmid} here{deleted}")
        for sub in (lo.disks_dir, lo.journal_dir, lo.undo_dir, lo.config):
            lo.checked(sub)
        with mapped("read state", lo.state):
            fd = os.open(lo.state, open_flags(write=False))
            try:
                with os.fdopen(fd, "rb", closefd=False) as f:
                    raw = f.read()
            finally:
                os.close(fd)
        try:
            state = ReplicaState.from_bytes(raw)
        except (ValueError, frproto.FrprotoError) as exc:
            raise frproto.InternalError(f"state file {lo.state} is damaged: {exc}") from exc
        if state.vmid != vmid:
            raise frproto.InternalError(f"state file {lo.state} belongs to {state.vmid}")
        replica = Replica(self._io, lo, state, self.keep_points)
        self._open[vmid] = replica
        return replica

    def set_keep_points(self, keep_points: int) -> None:
        """Keep ``keep_points`` recovery points from now on (open replicas prune to it at
        their next batch)."""
        if keep_points < 1:
            raise ValueError("keep_points must be at least 1")
        with self._lock:
            self.keep_points = keep_points
            for replica in self._open.values():
                replica.set_keep_points(keep_points)

    def opened(self, vmid: UUID) -> Replica | None:
        """The replica's instance if it is open (None otherwise; nothing is opened)."""
        with self._lock:
            return self._open.get(vmid)

    def forget(self, vmid: UUID) -> None:
        """Close the replica if it is open; the next :meth:`open` reads it from disk again
        (another node may have written it meanwhile: shared storage changed hands)."""
        with self._lock:
            replica = self._open.pop(vmid, None)
            if replica is not None:
                replica.close()

    def delete(self, vmid: UUID, *, tombstone: bool = True) -> None:
        """Remove the replica, leaving a tombstone (``is_deleted`` is then True).
        ``tombstone=False`` removes it without one: the replica moved to another node, it
        was not deleted."""
        with self._lock:
            lo = self._layout(vmid)
            if not self.exists(vmid):
                raise frproto.UnknownVM(f"no replica {vmid} here")
            replica = self._open.pop(vmid, None)
            if replica is not None:
                replica.close()
            io = self._io
            trash = self.root / lay.TRASH_DIR / f"{vmid}.{uuid.uuid4().hex}"
            tomb = lay.tombstone_path(self.root, vmid)
            with mapped("delete replica", lo.dir):
                if tombstone:
                    doc = json.dumps({"vmid": str(vmid), "deleted_at": time.time()}).encode()
                    io.write_file_durably(tomb, doc)
                io.rename(lo.dir, trash)
                io.fsync_dir(self.root)
                io.fsync_dir(trash.parent)
            io.remove_tree(trash)

    def recover(self) -> list[str]:
        """At startup: finish or discard interrupted batches of every replica and report
        interrupted IRs; remove half-created and half-deleted replicas."""
        log: list[str] = []
        with self._lock:
            for sub in (lay.STAGING_DIR, lay.TRASH_DIR):
                base = self.root / sub
                with mapped("list", base):
                    names = os.listdir(base)
                for name in names:
                    self._io.remove_tree(lay.check_inside(self.root, base / name))
                    log.append(f"removed leftover {sub}/{name}")
            for vmid in self.vmids():
                try:
                    log.extend(self._open_locked(vmid).recover())
                except frproto.FrprotoError as exc:
                    log.append(f"replica {vmid}: recovery failed: {exc}")
        return log


__all__ = ["ReplicaStore"]

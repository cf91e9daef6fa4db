"""Who may write what on a primary: the service's lock, and each VM's state and cycle locks.

A primary's state directory is shared by one running service and the operator's commands
(``frctl replication pause``, ``set``, ``disable``...), which are other processes. Three
advisory ``flock`` locks, all under ``<state_dir>/.locks/``, keep them from undoing each
other:

* ``service.lock``: held by a running primary service for its whole life, so a second
  service on the same state directory is refused instead of replicating the same VMs a
  second time (two writers of one pending log and one sequence).
* ``<vmid>.state``: held for the few microseconds of a read-modify-write of one VM's
  state file (:meth:`PrimaryStateStore.update`), so that a command's change (a pause) and
  the service's save of its progress never overwrite each other.
* ``<vmid>.cycle``: held by whoever reads the VM's disks or talks to its replica (a
  replication cycle, a resynchronization, a failover's last cycle). A pause sets
  ``paused`` first and then takes this lock: once it has it, the running cycle (if any)
  has ended, and the next one sees the pause before it captures anything.

``flock`` locks belong to an open file description, so they are released when the
process dies, however it dies: a killed service never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import trio

#: Name of the lock directory inside a primary's state directory (not a VMID: the
#: state store's listing skips it).
LOCK_DIR: Final = ".locks"
#: How often an asynchronous waiter tries a busy lock again (seconds).
_POLL: Final = 0.05


class LockBusy(Exception):
    """The lock is held by another process (or another holder in this one)."""


class ServiceAlreadyRunning(Exception):
    """Another primary service holds this state directory."""


class FileLock:
    """One exclusive ``flock`` on a file under ``<state_dir>/.locks/``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        self._fd = fd
        return True

    def acquire(self, timeout: float | None = None) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (None: as long as it takes).

        Raises:
            LockBusy: still held by someone else when the time ran out.
        """
        if timeout is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise LockBusy(f"{self.path.name} is held by another process")
            time.sleep(_POLL)

    async def acquire_async(self) -> None:
        """Take the lock from Trio code, polling so that the event loop never blocks."""
        while not self.try_acquire():
            await trio.sleep(_POLL)

    def release(self) -> None:
        """Let the lock go (a no-op when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def write_owner(self) -> None:
        """Record this process's id in the lock file, for the refusal message of others."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def owner(self) -> str:
        """The process id recorded by the holder, or '?' when unknown."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"


def lock_dir(state_dir: Path) -> Path:
    """The directory of a primary's lock files."""
    return Path(state_dir) / LOCK_DIR


def service_lock(state_dir: Path) -> FileLock:
    """Take the primary service's lock on ``state_dir``; held until released.

    Raises:
        ServiceAlreadyRunning: another service holds it (its process id is in the message).
    """
    lock = FileLock(lock_dir(state_dir) / "service.lock")
    if not lock.try_acquire():
        raise ServiceAlreadyRunning(
            f"another primary service (pid {lock.owner()}) already runs on the state "
            f"directory {Path(state_dir).resolve()}; two services would replicate the same "
            f"VMs twice. Stop it first, or give this one its own state_dir"
        )
    lock.write_owner()
    return lock


def service_running(state_dir: Path) -> bool:
    """Whether a primary service holds ``state_dir`` now."""
    lock = FileLock(lock_dir(state_dir) / "service.lock")
    if lock.try_acquire():
        lock.release()
        return False
    return True


def state_lock(state_dir: Path, vmid: str) -> FileLock:
    """The lock of one VM's state file (not yet taken)."""
    return FileLock(lock_dir(state_dir) / f"{vmid}.state")


def cycle_lock(state_dir: Path, vmid: str) -> FileLock:
    """The lock of one VM's replication work (not yet taken)."""
    return FileLock(lock_dir(state_dir) / f"{vmid}.cycle")


@contextlib.contextmanager
def holding(lock: FileLock, timeout: float | None = None) -> Iterator[FileLock]:
    """``with holding(lock):``: acquire (see :meth:`FileLock.acquire`), then release."""
    lock.acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def holding_async(lock: FileLock) -> AsyncIterator[FileLock]:
    """``async with holding_async(lock):`` from Trio code."""
    await lock.acquire_async()
    try:
        yield lock
    finally:
        lock.release()

"""Test failover: a VM built from a kept recovery point in a place of its own, while
replication goes on; one command removes it.

The VM's config blob and disks are copied out as of the point
(``node/storage/point_copy.py``) into a new directory, which is marked as a test
failover (``TEST_MARKER``: the cleanup removes only such directories). A hook then tells
the embedding hypervisor tool to start the VM from those disks; the reference hook runs
a configured command with the directory and the disk paths in its environment. The
cleanup runs the stop hook first, then removes the directory.

Every path is made absolute before anything is read or written: the storage root's
containment check compares resolved paths, and the hooks may run in another directory.
The copy is built in a hidden staging directory beside the destination and renamed to it
only once complete and marked, so a failure part way removes the staging directory and
the destination never exists half-written. A process killed during the copy (or an
earlier version that failed) may still leave an unmarked directory of exactly what
``copy_point`` writes; the cleanup recognises that shape and removes it too.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import frproto
from node.storage.fileio import FileIO
from node.storage.layout import CONFIG_FILE, DISKS_DIR
from node.storage.point_copy import PointCopy, copy_point

#: The file that marks a directory as a test failover's (and says of what).
TEST_MARKER = "frrep-test-failover.json"
#: Infix of the staging directory a test failover is built in (``.<name>.<infix>-<hex>``).
STAGING_INFIX: Final = "frrep-partial"
#: A disk image's name as ``copy_point`` writes it (a disk id frproto validated).
_IMAGE_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\.img\Z")


class HookFailed(Exception):
    """The embedding tool's hook command failed."""


@dataclass(frozen=True)
class CommandHook:
    """The reference hook: runs ``command`` through the shell, with ``FRREP_VM_DIR``,
    ``FRREP_VMID``, ``FRREP_SEQUENCE``, ``FRREP_CONFIG`` and ``FRREP_DISKS``
    (colon-separated image paths) in its environment."""

    command: str

    def __call__(self, copy: PointCopy) -> None:
        env = {
            **os.environ,
            "FRREP_VM_DIR": str(copy.directory),
            "FRREP_VMID": str(copy.vmid),
            "FRREP_SEQUENCE": str(copy.sequence),
            "FRREP_CONFIG": str(copy.config),
            "FRREP_DISKS": ":".join(str(p) for p in copy.disks),
        }
        done = subprocess.run(self.command, shell=True, env=env, check=False, capture_output=True)
        if done.returncode:
            raise HookFailed(
                f"hook {self.command!r} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )


def find_replica(storages: list[Path], vmid: uuid.UUID) -> Path:
    """The storage location (of ``storages``) that holds the replica of ``vmid``."""
    for storage in storages:
        if (storage / str(vmid) / "state.json").exists():
            return storage
    raise frproto.UnknownVM(f"no replica of {vmid} in {', '.join(map(str, storages))}")


def _missing_ancestors(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first (``copy_point``
    creates them; a failed test failover removes them again)."""
    missing = []
    for parent in path.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    return missing


def _rebased(copy: PointCopy, staging: Path, out: Path) -> PointCopy:
    """``copy`` with its paths moved from the staging directory to ``out``."""

    def moved(path: Path) -> Path:
        return out / path.relative_to(staging)

    return replace(
        copy,
        directory=out,
        config=moved(copy.config),
        disks=tuple(moved(p) for p in copy.disks),
    )


def _to_qcow2(raw: Path) -> Path:
    """``raw`` converted to a qcow2 beside it (``NAME.qcow2``); the raw copy removed."""
    qcow2 = raw.with_suffix(".qcow2")
    try:
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
            check=True,
            capture_output=True,
        )
    except FileNotFoundError:
        raise OSError(
            errno.ENOENT, "qcow2 disks need qemu-img: install Debian's qemu-utils"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise OSError(
            errno.EIO, f"qemu-img convert: {exc.stderr.decode(errors='replace')}"
        ) from None
    raw.unlink()
    return qcow2


def start_test_failover(
    storages: list[Path],
    vmid: uuid.UUID,
    out: Path,
    *,
    sequence: int | None = None,
    start: CommandHook | None = None,
    disk_format: str = "raw",
) -> PointCopy:
    """Build the test VM in ``out`` (a new directory) and run the start hook, if any.

    ``disk_format`` ``qcow2`` hands out the disks as qcow2 images (``qemu-img convert``
    from the raw copies, zeros left unallocated) for a hypervisor that wants them; the
    replica itself stays raw (``docs/qemu.md``).

    If building fails, nothing it wrote is left (not even the parent directories it
    made). If the start hook fails, the complete, marked directory is left: the hook may
    have started part of the VM, which the cleanup's stop hook must see first.

    Raises:
        FileExistsError: ``out`` exists; frproto.UnknownVM / OutOfSequence: no such
            replica, or the point is not kept; OSError: the copy could not be written;
            HookFailed: the start hook failed.
    """
    # resolve(): the storage root's containment check compares against realpath().
    storages = [s.resolve() for s in storages]
    # absolute(), not resolve(): a symlink given as the destination is refused below,
    # not followed to somewhere else.
    out = Path(os.path.abspath(out))
    if os.path.lexists(out):
        raise FileExistsError(errno.EEXIST, "the test failover's directory exists", str(out))
    storage = find_replica(storages, vmid)
    created = _missing_ancestors(out)
    staging = out.parent / f".{out.name}.{STAGING_INFIX}-{uuid.uuid4().hex[:12]}"
    try:
        built = copy_point(storage, vmid, staging, sequence=sequence)
        if disk_format == "qcow2":
            built = replace(built, disks=tuple(_to_qcow2(p) for p in built.disks))
        elif disk_format != "raw":
            raise ValueError(f"disk format {disk_format!r}: raw or qcow2")
        copy = _rebased(built, staging, out)
        marker = {
            "vmid": str(vmid),
            "sequence": copy.sequence,
            "disks": [str(p) for p in copy.disks],
        }
        io = FileIO(None)
        io.write_file_durably(staging / TEST_MARKER, (json.dumps(marker) + "\n").encode())
        io.rename(staging, out)
        # the rename survives a power cut only once the parent is synced
        io.fsync_dir(out.parent)
    except BaseException:
        # Whatever the failure (a full disk, a pruned point, ^C), remove all of it.
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break  # something else put files there meanwhile: leave it
        raise
    if start is not None:
        start(copy)
    return copy


def _is_bare_copy(directory: Path) -> bool:
    """True if ``directory`` holds only what ``copy_point`` writes (``config.bin`` and
    ``disks/<id>.img``, regular files, no symlinks): an unmarked test failover that
    failed part way, in this version (killed) or an earlier one."""
    names = set(os.listdir(directory))
    if not names or not names <= {CONFIG_FILE, DISKS_DIR}:
        return False
    if CONFIG_FILE in names and not stat.S_ISREG(os.lstat(directory / CONFIG_FILE).st_mode):
        return False
    if DISKS_DIR in names:
        disks = directory / DISKS_DIR
        if not stat.S_ISDIR(os.lstat(disks).st_mode):
            return False
        for name in os.listdir(disks):
            if not _IMAGE_NAME.match(name) or not stat.S_ISREG(os.lstat(disks / name).st_mode):
                return False
    return True


def _marked_disks(directory: Path, listed: object) -> tuple[Path, ...]:
    """The marker's disks, each as ``directory/disks/<id>.img``.

    The marker may hold paths from before the directory was moved, or relative to where
    an earlier version ran; only the image's name is kept. A path with ``..`` or one not
    in a ``disks`` directory is refused: the stop hook would be handed a file elsewhere.
    """
    if not isinstance(listed, list):
        raise ValueError(f"{directory / TEST_MARKER}: 'disks' must be a list")
    disks = []
    for item in listed:
        path = Path(str(item))
        if ".." in path.parts or path.parent.name != DISKS_DIR or not _IMAGE_NAME.match(path.name):
            raise ValueError(f"{directory / TEST_MARKER}: disk {item!r} is outside {directory}")
        disks.append(directory / DISKS_DIR / path.name)
    return tuple(disks)


def clean_up_test_failover(directory: Path, *, stop: CommandHook | None = None) -> None:
    """Run the stop hook, then remove a test failover's directory: one marked so, or one
    a failed test failover left unmarked (see :func:`_is_bare_copy`).

    Raises:
        ValueError: ``directory`` is not a test failover's (or is a symlink to one).
    """
    directory = Path(os.path.abspath(directory))
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        raise ValueError(f"nothing to clean up: {directory} does not exist") from None
    if stat.S_ISLNK(mode):
        raise ValueError(f"{directory} is a symlink: give the test failover's directory itself")
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{directory} is not a test failover's directory (not a directory)")
    marker = directory / TEST_MARKER
    if os.path.lexists(marker):
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            raise ValueError(f"{marker} is not a regular file")
        try:
            doc = json.loads(marker.read_text())
            vmid = uuid.UUID(doc["vmid"])
            sequence = int(doc["sequence"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{marker}: unreadable marker ({exc})") from None
        disks = _marked_disks(directory, doc.get("disks", []))
        if stop is not None:
            config = directory / CONFIG_FILE
            stop(PointCopy(vmid, sequence, directory, config, disks, 0, 0.0))
    elif not _is_bare_copy(directory):
        raise ValueError(f"{directory} is not a test failover's directory (no {TEST_MARKER})")
    # An unmarked directory never reached the start hook: there is no VM to stop.
    shutil.rmtree(directory)

"""The VM's disk images as the primary sees them: present, regular files, of the size the
replica was made with.

Every cycle checks this before it reads anything (and :func:`read_blocks` and the scan
refuse an image that ends early), because a disk that changed size cannot be replicated
by delta batches: the replica was created with the old sizes.

* A disk that **grew** would have its new end never sent while verification compares
  only the old extent: replication halts (:class:`DiskResized`) instead of carrying on
  with a replica that silently lacks data.
* A disk that **shrank** would read as zeros past its new end and replace the replica's
  data with them: replication halts the same way, and nothing is written.
* A disk that is **missing** or not a regular file is :class:`DiskUnavailable`: the
  cycle fails, the VM shows ``critical`` with the reason, and later cycles try again
  (storage may come back).

``frctl replication reseed`` carries a resized VM on: the replica is removed at the
recovery side and the disks are replicated anew at their new sizes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .image_view import view_of


class DiskProblem(Exception):
    """A disk image cannot be replicated as it is."""


class DiskUnavailable(DiskProblem):
    """A disk image is missing, unreadable or not a regular file (a later cycle may find
    it again)."""


class DiskResized(DiskProblem):
    """A disk image's size differs from the replica's: replication waits for a person."""


def size_text(size: int) -> str:
    """``32 MiB``, ``1.5 GiB``, ``4096 bytes``: a size as an operator reads it."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if size % factor == 0 else f"{value:.2f} {unit}"
    return f"{size} bytes"


def image_size(disk_id: str, path: Path) -> int:
    """The size of one disk image.

    Read through the view installed for ``path``, if any (a hypervisor's point in
    time, :mod:`node.primary.image_view`): then the disk's size, not the file's.

    Raises:
        DiskUnavailable: the image is missing, cannot be looked at, or is not a file.
    """
    view = view_of(path)
    if view is not None:
        return view.size
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DiskUnavailable(f"{disk_id}: the image {path} does not exist") from None
    except OSError as exc:
        raise DiskUnavailable(f"{disk_id}: the image {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DiskUnavailable(f"{disk_id}: the image {path} is not a regular file")
    return info.st_size


def resize_message(disk_id: str, was: int, now: int, vmid: str) -> str:
    """Why replication halted for a disk whose size went from ``was`` to ``now``."""
    carry_on = (
        f"`frctl replication reseed {vmid}` replicates the disks anew at their new sizes "
        f"(a full initial replication; the replica's recovery points are removed)"
    )
    if now > was:
        return (
            f"{disk_id} grew from {size_text(was)} to {size_text(now)}: the replica cannot "
            f"grow with it, so what was written past the old end would never be "
            f"replicated; replication halted. {carry_on}"
        )
    return (
        f"{disk_id} shrank from {size_text(was)} to {size_text(now)}: replicating it would "
        f"replace the replica's data past {size_text(now)} with zeros; replication halted "
        f"and nothing was sent. Restore the image and `frctl replication resume {vmid}`, "
        f"or, if the shrink is intended, {carry_on}"
    )


def check_disks(disks: Sequence[Mapping[str, Any]], vmid: str) -> None:
    """Check every disk of a VM's state (``{"disk_id", "path", "size"}``) against its
    image: present, a regular file, and of the recorded size.

    Raises:
        DiskUnavailable: an image is missing or not a file (the first one found).
        DiskResized: an image has another size than the replica's disk.
    """
    for disk in disks:
        disk_id, size = str(disk["disk_id"]), int(disk["size"])
        now = image_size(disk_id, Path(disk["path"]))
        if now != size:
            raise DiskResized(resize_message(disk_id, size, now, vmid))


def size_differences(disks: Sequence[Mapping[str, Any]], replica_sizes: Sequence[int]) -> list[str]:
    """What verification reports about sizes: every disk whose image, recorded size and
    replica size do not all agree (an empty list when they do)."""
    found = []
    for index, disk in enumerate(disks):
        disk_id, size = str(disk["disk_id"]), int(disk["size"])
        try:
            now = image_size(disk_id, Path(disk["path"]))
        except DiskUnavailable as exc:
            found.append(str(exc))
            continue
        theirs = replica_sizes[index] if index < len(replica_sizes) else None
        if theirs is None:
            found.append(f"{disk_id}: the replica has no such disk")
        elif now != theirs:
            found.append(
                f"{disk_id} is {size_text(now)} on the primary but {size_text(theirs)} in "
                f"the replica"
            )
        elif size != theirs:
            found.append(
                f"{disk_id}: the primary recorded {size_text(size)}, the replica holds "
                f"{size_text(theirs)}"
            )
    if len(replica_sizes) > len(disks):
        found.append(f"the replica has {len(replica_sizes)} disks, the primary {len(disks)}")
    return found

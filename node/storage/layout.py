"""Where the replica storage engine keeps things: the on-disk layout.

::

    <root>/
      <vmid>/                      one replica; <vmid> is the UUID's canonical string
        state.json                 the replica's durable state (JSON; atomic replace)
        config.bin                 the VM configuration blob (written once, at create)
        disks/<disk_id>.img        one sparse image per disk, exactly the disk size
        journal/<seq>.jrnl         redo journal of the delta batch being committed
        undo/<seq>.undo            what batch <seq> overwrote: recovery-point data
        spare/<n>.spare            finished journal/undo files kept for reuse (a cache:
                                   removed when the replica is opened)
      .tombstones/<vmid>           a deleted replica (JSON: when it was deleted)
      .staging/<vmid>.<nonce>/     a replica being created (renamed to <vmid>/ when durable)
      .trash/<vmid>.<nonce>/       a replica being deleted (removed after the rename)

``<seq>`` is the batch sequence number as 20 decimal digits, so names sort by sequence.
Temporary files end in ``.tmp`` and are removed by ``ReplicaStore.recover``.

``state.json`` holds: ``format`` (1), ``vmid``, ``name``, ``disks`` (list of
``{"disk_id", "size"}``), ``primary``, ``trust_group``, ``generation``, ``ir_state``
(0 not started, 1 in progress, 2 complete), ``ir_sequence``, ``ir_cursor``
(``[disk_index, offset]``), ``ir_resumed``, ``applied_sequence`` and ``points`` (list of
``{"sequence", "captured_at_ms", "applied_at"}``, oldest first).

The journal and undo file formats are described in :mod:`node.storage.journal`;
``docs/storage.md`` gives the crash-consistency argument.

Paths are built only from a UUID's canonical string and from disk ids that frproto
validated (``[A-Za-z0-9_-][A-Za-z0-9._-]*``, at most 64 bytes). As defence in depth,
:func:`check_inside` refuses any path whose components below the root are symlinks or
that does not resolve inside the root, and files are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from uuid import UUID

import frproto

STATE_FILE: Final = "state.json"
CONFIG_FILE: Final = "config.bin"
DISKS_DIR: Final = "disks"
JOURNAL_DIR: Final = "journal"
UNDO_DIR: Final = "undo"
SPARE_DIR: Final = "spare"
SPARE_SUFFIX: Final = ".spare"
TOMBSTONES_DIR: Final = ".tombstones"
STAGING_DIR: Final = ".staging"
TRASH_DIR: Final = ".trash"
QUARANTINE_DIR: Final = ".quarantine"  # damaged replicas an operator set aside
JOURNAL_SUFFIX: Final = ".jrnl"
UNDO_SUFFIX: Final = ".undo"
TMP_SUFFIX: Final = ".tmp"

_DISK_ID: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")
_SEQ_NAME: Final = re.compile(r"(\d{20})(\.jrnl|\.undo)\Z")


def check_disk_id(disk_id: str) -> None:
    """Refuse a disk id that could not have passed frproto's validation."""
    if not _DISK_ID.match(disk_id):
        raise frproto.BadName(f"disk id {disk_id!r} is not a safe file name")


def seq_name(sequence: int, suffix: str) -> str:
    return f"{sequence:020d}{suffix}"


def parse_seq_name(name: str, suffix: str) -> int | None:
    """The sequence of a journal or undo file name, or None for any other name."""
    m = _SEQ_NAME.match(name)
    if m is None or m.group(2) != suffix:
        return None
    return int(m.group(1))


def check_inside(root: Path, path: Path) -> Path:
    """Return ``path`` if it lies inside ``root`` with no symlink among the components
    below ``root`` that exist; raise :class:`frproto.InternalError` otherwise.

    ``root`` must already be resolved.
    """
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise frproto.InternalError(f"path {path} is outside the storage root {root}") from None
    current = root
    for part in rel.parts:
        if part in ("", ".", "..") or os.sep in part:
            raise frproto.InternalError(f"path {path} has an unsafe component {part!r}")
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        except OSError as exc:
            raise frproto.InternalError(f"lstat {current}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise frproto.InternalError(f"refusing symlink {current} inside the storage root")
    if not os.path.realpath(path).startswith(str(root) + os.sep):
        raise frproto.InternalError(f"path {path} resolves outside the storage root {root}")
    return path


@dataclass(frozen=True, slots=True)
class ReplicaLayout:
    """The paths of one replica's files (built, not checked; see :meth:`checked`)."""

    root: Path
    vmid: UUID

    @property
    def dir(self) -> Path:
        return self.root / str(self.vmid)

    @property
    def state(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def config(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def disks_dir(self) -> Path:
        return self.dir / DISKS_DIR

    @property
    def journal_dir(self) -> Path:
        return self.dir / JOURNAL_DIR

    @property
    def undo_dir(self) -> Path:
        return self.dir / UNDO_DIR

    @property
    def spare_dir(self) -> Path:
        return self.dir / SPARE_DIR

    def image(self, disk_id: str) -> Path:
        check_disk_id(disk_id)
        return self.disks_dir / f"{disk_id}.img"

    def journal(self, sequence: int) -> Path:
        return self.journal_dir / seq_name(sequence, JOURNAL_SUFFIX)

    def undo(self, sequence: int) -> Path:
        return self.undo_dir / seq_name(sequence, UNDO_SUFFIX)

    def checked(self, path: Path) -> Path:
        return check_inside(self.root, path)


def tombstone_path(root: Path, vmid: UUID) -> Path:
    return root / TOMBSTONES_DIR / str(vmid)


def parse_vmid_dir(name: str) -> UUID | None:
    """The VMID of a replica directory name, or None (only canonical strings count)."""
    try:
        vmid = UUID(name)
    except ValueError:
        return None
    return vmid if str(vmid) == name else None

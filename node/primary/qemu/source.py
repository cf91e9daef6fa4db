"""QEMU as a VM's change source: persistent dirty bitmaps and a fleecing point in time.

What frrep creates in QEMU (all named with :data:`BITMAP_PREFIX` / ``frrep-``):

* one **dirty bitmap** per disk, ``frrep-<ms>``, persistent on qcow2 nodes (kept in the
  image across QEMU restarts), recording every guest write since the last capture;
* for one cycle only: a **fleecing node** ``frrep-fleece-<i>`` per disk (a scratch qcow2
  in the VM's primary directory, backed by the disk's node), a ``blockdev-backup
  sync=none`` job ``frrep-job-<i>`` that copies to it what the guest overwrites (copy
  before write), and an **NBD export** ``frrep-pit-<i>`` of it, with the frozen bitmap;
  the NBD server too, on a UNIX socket of our own, unless the VM's configuration names
  one QEMU already runs.

A cycle (:meth:`QemuSource.open_point`): one QMP ``transaction`` for all disks at once
disables each disk's bitmap, adds a new one and starts the fleecing jobs: that instant is
the point in time, and the guest never stops. The exports then show every disk as it
was at that instant; the frozen bitmap says which blocks changed since the last point.
:meth:`PointInTime.close` removes the fleecing state and either drops the frozen bitmaps
(``commit``: what they marked is captured for good) or merges them back into the new
ones (the cycle failed: no change is lost).

Whatever happens (an exception, a cancelled cycle, a killed primary or QEMU), the next
:meth:`~QemuSource.open_point` first removes every ``frrep-`` leftover and merges any
frozen bitmap back. A disk with no bitmap of ours, or an inconsistent one (QEMU
restarted without it, the image replaced, a crash of QEMU with the bitmap in use), gets
a new one and the point says it is **lost**: the replicator then resynchronizes by
digests, never a silent gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..disks import DiskUnavailable
from .nbd_view import NbdDiskView, require_libnbd
from .qmp import QemuError, QemuUnavailable, QMPConnection

log = logging.getLogger("frrep.primary.qemu")

#: Everything frrep creates in QEMU starts so.
BITMAP_PREFIX: Final = "frrep-"
_FLEECE: Final = "frrep-fleece-"
_JOB: Final = "frrep-job-"
_EXPORT: Final = "frrep-pit-"
#: Marks that frrep started QEMU's NBD server (so that it stops it, even after a crash).
_OUR_SERVER: Final = "nbd-server-ours"
#: Longest UNIX socket path (sun_path, less its terminating NUL).
_SUN_PATH: Final = 107
#: Bitmap granularity asked for (QEMU's default for qcow2 clusters too).
GRANULARITY: Final = 65536


@dataclass
class QemuSource:
    """A VM run by QEMU, as its change source.

    Attributes:
        qmp_socket: QEMU's QMP monitor (a UNIX socket).
        nodes: the block node name of each disk, by disk index.
        work_dir: frrep's own directory for this VM (fleecing files, our NBD socket).
        nbd_socket: the UNIX socket of an NBD server QEMU already runs (QEMU has one at
            most); None: frrep starts one for each cycle on its own socket.
    """

    qmp_socket: str
    nodes: Sequence[str]
    work_dir: Path
    nbd_socket: str | None = None

    @classmethod
    def of_state(
        cls, qemu: dict[str, Any], disks: Sequence[dict[str, Any]], work_dir: Path
    ) -> QemuSource:
        """The source a VM's state describes (its ``qemu`` field and disks' nodes)."""
        return cls(
            qmp_socket=str(qemu["qmp"]),
            nodes=[str(d["qemu_node"]) for d in disks],
            work_dir=work_dir,
            nbd_socket=qemu.get("nbd"),
        )

    def own_nbd_socket(self) -> str:
        """Where frrep's own NBD server listens: the VM's directory, or a short name in
        the temporary directory when that path is too long for a UNIX socket."""
        socket = self.work_dir / "nbd.sock"
        if len(os.fsencode(socket)) < _SUN_PATH:
            return str(socket)
        digest = hashlib.sha256(os.fsencode(self.work_dir)).hexdigest()[:16]
        return str(Path(tempfile.gettempdir()) / f"frrep-nbd-{digest}.sock")

    def connect(self) -> QMPConnection:
        """A new QMP session (one per cycle: QEMU may have restarted in between)."""
        require_libnbd()
        return QMPConnection(self.qmp_socket)

    def disk_sizes(self) -> list[int]:
        """The virtual size of each disk, as QEMU sees it."""
        qmp = self.connect()
        try:
            found = _nodes_by_name(qmp)
            return [int(_node(found, name)["image"]["virtual-size"]) for name in self.nodes]
        finally:
            qmp.close()

    # -- one cycle ------------------------------------------------------------------------

    def open_point(self, *, expect_bitmaps: bool) -> PointInTime:
        """Clean up leftovers, check the bitmaps, then take the point in time of every
        disk at once and export it. ``expect_bitmaps``: the VM was replicated before, so
        a missing bitmap is a lost one (on the first cycle it is simply created).

        Raises:
            QemuUnavailable: QEMU cannot be reached.
            QemuError: QEMU refused a step (nothing of the point is left behind).
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        qmp = self.connect()
        point = PointInTime(self)
        try:
            self._clean_leftovers(qmp)
            point.lost = self._check_bitmaps(qmp, expect_bitmaps)
            self._take(qmp, point)
            self._export(qmp, point)
        except BaseException:
            point.close(commit=False, qmp=qmp)
            raise
        finally:
            # The monitor is free while the point is read (an IR may take hours, and a
            # QMP socket serves one client at a time); close() connects again.
            qmp.close()
        return point

    def _check_bitmaps(self, qmp: QMPConnection, expect: bool) -> list[str]:
        """Make sure every disk has one recording bitmap of ours; the disks that had
        none (or an inconsistent one) are returned: their changes are unknown."""
        found = _nodes_by_name(qmp)
        lost = []
        for name in self.nodes:
            node = _node(found, name)
            ours = _our_bitmaps(node)
            bad = [b for b in ours if b.get("inconsistent")]
            for bitmap in bad:
                qmp.execute("block-dirty-bitmap-remove", {"node": name, "name": bitmap["name"]})
            recording = [b["name"] for b in ours if b.get("recording") and b not in bad]
            if not bad and len(recording) > 1:
                # Two of ours recording (never made so by frrep): keep one, lose nothing.
                _merge_back(qmp, name, recording[1:], recording[0])
                continue
            if bad or not recording:
                for bitmap in ours:
                    if bitmap not in bad:
                        qmp.execute(
                            "block-dirty-bitmap-remove", {"node": name, "name": bitmap["name"]}
                        )
                qmp.execute("block-dirty-bitmap-add", _new_bitmap(node, _bitmap_name()))
                if expect or bad:
                    why = "inconsistent" if bad else "missing"
                    log.warning("QEMU node %s: frrep's dirty bitmap is %s", name, why)
                    lost.append(f"{name}: bitmap {why}")
        return lost

    def _take(self, qmp: QMPConnection, point: PointInTime) -> None:
        found = _nodes_by_name(qmp)
        new = _bitmap_name()
        actions: list[dict[str, Any]] = []
        for index, name in enumerate(self.nodes):
            node = _node(found, name)
            (active,) = [b for b in _our_bitmaps(node) if b.get("recording")]
            fleece = self.work_dir / f"{_FLEECE}{index}.qcow2"
            size = int(node["image"]["virtual-size"])
            _run_qemu_img("create", "-q", "-f", "qcow2", str(fleece), str(size))
            qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": f"{_FLEECE}{index}",
                    "file": {"driver": "file", "filename": str(fleece)},
                    "backing": name,
                },
            )
            point.frozen.append(active["name"])
            actions += [
                _action("block-dirty-bitmap-disable", node=name, name=active["name"]),
                _action("block-dirty-bitmap-add", **_new_bitmap(node, new)),
                _action(
                    "blockdev-backup",
                    device=name,
                    target=f"{_FLEECE}{index}",
                    sync="none",
                    **{"job-id": f"{_JOB}{index}", "auto-dismiss": True},
                ),
            ]
        qmp.execute("transaction", {"actions": actions})
        point.taken_at = time.time()
        point.active = new

    def _export(self, qmp: QMPConnection, point: PointInTime) -> None:
        socket = self.nbd_socket
        if socket is None:
            socket = self.own_nbd_socket()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket)
            (self.work_dir / _OUR_SERVER).write_text(socket)
            qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket}}})
        for index, name in enumerate(self.nodes):
            qmp.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": f"{_EXPORT}{index}",
                    "node-name": f"{_FLEECE}{index}",
                    "name": f"{_EXPORT}{index}",
                    "writable": False,
                    "bitmaps": [{"node": name, "name": point.frozen[index]}],
                },
            )
            point.views.append(NbdDiskView(socket, f"{_EXPORT}{index}", point.frozen[index]))

    # -- cleaning up ----------------------------------------------------------------------

    def _clean_leftovers(self, qmp: QMPConnection) -> None:
        """Remove every ``frrep-`` export, job and fleecing node, and merge any frozen
        bitmap back into the recording one (a cycle that did not finish)."""
        self._remove_fleecing(qmp)
        found = _nodes_by_name(qmp)
        for name in self.nodes:
            ours = _our_bitmaps(_node(found, name))
            frozen = [b["name"] for b in ours if not b.get("recording")]
            recording = [b["name"] for b in ours if b.get("recording")]
            if not frozen:
                continue
            if not recording:
                # Killed between the disable and the add? The transaction is atomic, so
                # only a lost new bitmap gets here: recording starts again on the first.
                qmp.execute("block-dirty-bitmap-enable", {"node": name, "name": frozen[0]})
                recording, frozen = [frozen[0]], frozen[1:]
            _merge_back(qmp, name, frozen, recording[0])
            log.info("QEMU node %s: merged back the bitmaps of an unfinished cycle", name)

    def _remove_fleecing(self, qmp: QMPConnection) -> None:
        """Remove every ``frrep-`` export, fleecing job and node, their files, and the NBD
        server if frrep started it."""

        def ours(query: str, key: str, prefix: str) -> list[str]:
            return [x[key] for x in qmp.execute(query) if x[key].startswith(prefix)]

        for export in ours("query-block-exports", "id", BITMAP_PREFIX):
            with contextlib.suppress(QemuError):
                qmp.execute("block-export-del", {"id": export, "mode": "hard"})
        _wait_until(lambda: not ours("query-block-exports", "id", BITMAP_PREFIX), "exports")
        for job in ours("query-block-jobs", "device", _JOB):
            with contextlib.suppress(QemuError):
                qmp.execute("block-job-cancel", {"device": job, "force": True})
        _wait_until(lambda: not ours("query-block-jobs", "device", _JOB), "fleecing jobs")
        for node in qmp.execute("query-named-block-nodes", {"flat": True}):
            if node.get("node-name", "").startswith(_FLEECE):
                qmp.execute("blockdev-del", {"node-name": node["node-name"]})
        for leftover in self.work_dir.glob(f"{_FLEECE}*.qcow2"):
            leftover.unlink(missing_ok=True)
        marker = self.work_dir / _OUR_SERVER
        if marker.exists():
            with contextlib.suppress(QemuError):
                qmp.execute("nbd-server-stop")
            marker.unlink()


@dataclass
class PointInTime:
    """The point in time of one cycle: a view of every disk, and which blocks changed.

    Attributes:
        views: one NBD view per disk, by disk index (read-only, as of :attr:`taken_at`).
        frozen: the bitmap read by this cycle, per disk.
        active: the bitmap recording since the point (same name on every disk).
        lost: the disks whose bitmap had to be created anew (their changes are unknown:
            resynchronize); empty when tracking is intact.
        taken_at: when the transaction ran (wall clock).
    """

    source: QemuSource
    views: list[NbdDiskView] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    active: str = ""
    lost: list[str] = field(default_factory=list)
    taken_at: float = 0.0
    closed: bool = False
    #: The cycle captured the dirty blocks durably (the pending log holds them).
    captured: bool = False
    #: Drop the frozen bitmaps at :meth:`close` (what they mark is captured, or a
    #: resynchronization compared every block); else they are merged back.
    commit: bool = False

    def dirty_blocks(self, block_size: int) -> dict[int, list[int]]:
        """``{disk index: blocks}`` the frozen bitmaps mark (disks with none left out)."""
        return {
            index: blocks
            for index, view in enumerate(self.views)
            if (blocks := view.dirty_blocks(block_size))
        }

    def close(self, *, commit: bool, qmp: QMPConnection | None = None) -> None:
        """Remove the fleecing state; then drop the frozen bitmaps (``commit``) or merge
        them back into the recording ones. Idempotent; a step QEMU refuses (or QEMU gone)
        is left for the next cycle's cleanup, which merges back. ``qmp``: a session to
        use (else a new one)."""
        if self.closed:
            return
        self.closed = True
        for view in self.views:
            view.close()
        session = None
        try:
            if qmp is None:
                qmp = session = self.source.connect()
            if commit:
                self.source._remove_fleecing(qmp)
                for name, frozen in zip(self.source.nodes, self.frozen, strict=True):
                    qmp.execute("block-dirty-bitmap-remove", {"node": name, "name": frozen})
            else:
                self.source._clean_leftovers(qmp)
        except (QemuError, QemuUnavailable, DiskUnavailable) as exc:
            log.warning("cleaning up the point in time failed (the next cycle does): %s", exc)
        finally:
            if session is not None:
                session.close()


# -- helpers --------------------------------------------------------------------------------


_NAMES = itertools.count()


def _bitmap_name() -> str:
    # Unique per cycle: QEMU cannot rename a bitmap, so the new one gets a new name (the
    # clock keeps names apart across processes, the counter within one).
    return f"{BITMAP_PREFIX}{time.time_ns() // 1_000_000:x}-{next(_NAMES)}"


def _new_bitmap(node: dict[str, Any], name: str) -> dict[str, Any]:
    # Only qcow2 can keep a bitmap in the image; on raw it lives as long as QEMU does
    # (a restarted QEMU finds none: the replicator resynchronizes by digests).
    persistent = node.get("drv") == "qcow2"
    return {
        "node": node["node-name"],
        "name": name,
        "persistent": persistent,
        "granularity": GRANULARITY,
    }


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def _merge_back(qmp: QMPConnection, node: str, frozen: list[str], into: str) -> None:
    if frozen:
        qmp.execute("block-dirty-bitmap-merge", {"node": node, "target": into, "bitmaps": frozen})
    for name in frozen:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


def _nodes_by_name(qmp: QMPConnection) -> dict[str, dict[str, Any]]:
    return {
        n["node-name"]: n
        for n in qmp.execute("query-named-block-nodes", {"flat": True})
        if "node-name" in n
    }


def _node(found: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    try:
        return found[name]
    except KeyError:
        raise DiskUnavailable(f"QEMU has no block node {name!r}") from None


def _our_bitmaps(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in node.get("dirty-bitmaps", []) if b.get("name", "").startswith(BITMAP_PREFIX)]


def _wait_until(done: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise QemuError("cleanup", f"timed out waiting for the frrep {what} to go")
        time.sleep(0.01)


def _run_qemu_img(*args: str) -> None:
    try:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise DiskUnavailable(
            "replicating a QEMU VM needs qemu-img: install Debian's qemu-utils"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise QemuError("qemu-img " + args[0], exc.stderr.decode(errors="replace")) from None

"""The out-of-band IR of a VM that QEMU runs (``docs/oob-ir.md``, ``docs/qemu.md``).

The export reads one point in time of all the VM's disks through QEMU, the guest
running, and the dirty bitmaps start anew at that instant: once the recovery server has
imported the file, the first cycle sends what the guest wrote since the export, as it
would after an export of a paused VM's files.
"""

from __future__ import annotations

from pathlib import Path

from node.oob_file import Progress

from ..image_view import viewing
from ..oob_export import ExportResult, export_ir
from ..state import PrimaryStateStore, VMReplicationState
from .source import QemuSource


def export_ir_from_qemu(
    state: VMReplicationState,
    store_root: Path,
    out: Path,
    *,
    config: bytes = b"",
    progress: Progress | None = None,
) -> ExportResult:
    """:func:`~node.primary.oob_export.export_ir` of a QEMU VM (``state.qemu`` set), read
    through a point in time. On success the bitmaps frozen at the point are dropped (the
    export holds what they marked); on failure they are merged back. Synchronous.

    Raises:
        as ``export_ir``; QemuUnavailable, QemuError: QEMU cannot be reached or refused.
    """
    if state.qemu is None:
        raise ValueError(f"{state.name} does not name a QEMU (enable it with --qemu-qmp)")
    work_dir = PrimaryStateStore(store_root).vm_dir(state.vmid) / "qemu"
    source = QemuSource.of_state(state.qemu, state.disks, work_dir)
    # Nothing was replicated yet: a missing bitmap is simply created at this point.
    point = source.open_point(expect_bitmaps=False)
    try:
        images = [str(d["path"]) for d in state.disks]
        with viewing(dict(zip(images, point.views, strict=True))):
            result = export_ir(state, store_root, out, config=config, progress=progress)
        point.commit = True
        return result
    finally:
        point.close(commit=point.commit)

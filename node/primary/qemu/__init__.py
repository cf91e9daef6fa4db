"""QEMU/KVM as the change source of a running VM: dirty bitmaps, fleecing, NBD.

A primary replicating a VM that QEMU runs (by hand, under libvirt, or
``qemu-storage-daemon``) asks QEMU itself what the guest wrote and reads a consistent
point in time of all the VM's disks without pausing the guest, the way libvirt's
incremental backup and Proxmox's backups do:

* ``qmp.py``: a blocking QMP client over the ``qemu.qmp`` library (asyncio, run in a
  thread of its own), called from Trio through ``trio.to_thread``;
* ``nbd_view.py``: one disk of a point in time read over NBD with libnbd: its data, its
  dirty bitmap (``qemu:dirty-bitmap:NAME``) and its allocation (``base:allocation``, so
  unallocated and zero extents are never read);
* ``source.py``: the change source: the persistent bitmaps, the per-cycle
  ``transaction`` (new bitmap + fleecing for every disk at once), the exports, and the
  cleanup and merge-back that keep every change whatever happens.

``docs/qemu.md`` says how to point frrep at a VM and what it creates in QEMU.
"""

from .qmp import QemuError, QemuUnavailable
from .source import BITMAP_PREFIX, PointInTime, QemuSource

__all__ = ["BITMAP_PREFIX", "PointInTime", "QemuError", "QemuSource", "QemuUnavailable"]

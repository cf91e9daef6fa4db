"""Reading a disk through a view instead of its image file: a hypervisor's point in time.

The primary reads its disks by path (:mod:`node.primary.scan`, the IR in
:meth:`~node.primary.client.RecoveryClient.send_ir`, the sizes in
:mod:`node.primary.disks`). A change source that offers a consistent point in time of
a running VM (:mod:`node.primary.qemu`: a fleecing export read over NBD) installs a view
per image path for the length of a cycle with :func:`viewing`; every read of that path
then goes to the view, the same code paths serving files and views alike. A context
variable carries the views, so they reach the worker threads
(``trio.to_thread.run_sync`` runs in a copy of the caller's context) and never leak to
another VM's task.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol


class ImageView(Protocol):
    """What the readers need of a disk seen through a view."""

    @property
    def size(self) -> int:
        """The disk's size in bytes (a qcow2's virtual size, not its file's)."""
        ...

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the disk's end)."""
        ...


_VIEWS: contextvars.ContextVar[Mapping[str, ImageView] | None] = contextvars.ContextVar(
    "frrep_image_views", default=None
)


def view_of(path: Path | str) -> ImageView | None:
    """The view installed for ``path`` in this context, or None: read the file."""
    views = _VIEWS.get()
    return None if views is None else views.get(str(path))


@contextlib.contextmanager
def viewing(views: Mapping[str, ImageView]) -> Iterator[None]:
    """Read the images named by ``views``' keys (paths) through their views inside the
    block (and in the worker threads it starts)."""
    token = _VIEWS.set({**(_VIEWS.get() or {}), **views})
    try:
        yield
    finally:
        _VIEWS.reset(token)

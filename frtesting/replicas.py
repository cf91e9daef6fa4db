"""A replica's files read from outside its recovery server, by tests and benchmarks.

A recovery server acknowledges a delta batch once its journal is durable and applies it
after the Ack (the pipelined commit, ``docs/storage.md``). Its own readers wait for that
apply; a test that reads the image file itself right after a cycle must wait too:
:func:`applied_image` returns the path once no committed journal is left in the
replica's ``journal/`` directory.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from node.storage.layout import JOURNAL_SUFFIX, ReplicaLayout

#: How long :func:`applied_image` waits for a batch's apply to end.
APPLY_TIMEOUT = 30.0


def wait_applied(layout: ReplicaLayout, *, timeout: float = APPLY_TIMEOUT) -> bool:
    """Wait until the replica's ``journal/`` holds no journal (no batch is being received
    or applied); False if one is still there after ``timeout`` seconds (a failed apply
    left it for recovery, or the replica does not exist yet: nothing to wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            busy = any(p.name.endswith(JOURNAL_SUFFIX) for p in layout.journal_dir.iterdir())
        except FileNotFoundError:
            return True
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def applied_image(
    storage: Path, vmid: uuid.UUID, disk_id: str, *, timeout: float = APPLY_TIMEOUT
) -> Path:
    """The image file of disk ``disk_id`` of the replica of ``vmid`` in the storage
    location ``storage``, once the last acknowledged batch is applied to it."""
    layout = ReplicaLayout(storage, vmid)
    wait_applied(layout, timeout=timeout)
    return layout.image(disk_id)

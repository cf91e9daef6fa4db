"""Where a storage location is claimed by one process: the recovery server that serves it.

A recovery server takes an exclusive ``flock`` on ``<storage>/.frrep-server.lock`` when
it opens the location and keeps it while it runs; a second server on the same location
is refused, and offline tools that change replicas (an unplanned failover) check that no
server holds it. The kernel drops the lock when the process dies, kill -9 included.
Shared storage in a cluster (every node sees the same files) is not claimed this way:
there, ownership in the cluster store says who serves each VM.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_NAME: Final = ".frrep-server.lock"


class StorageBusy(Exception):
    """Another process holds the storage location."""


def claim(storage: Path) -> int:
    """Claim ``storage`` for this process; the lock's descriptor (keep it open).

    Raises:
        StorageBusy: another process holds it.
    """
    storage.mkdir(parents=True, exist_ok=True)
    fd = os.open(storage / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageBusy(f"another process (a running recovery server?) holds {storage}") from None
    return fd

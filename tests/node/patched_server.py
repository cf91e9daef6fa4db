"""The real recovery server with a storage crash point armed, for crash tests of what a
running server does (``tests/node/test_failover_endings_running_e2e.py``).

``FRREP_TEST_CRASH_AT=NAME python -m tests.node.patched_server server run --config F``
runs ``frctl server run`` unchanged, but its storage engine kills the process with
SIGKILL when it reaches the crash point ``NAME`` (one of
``node.storage.fileio.CRASH_POINTS``), as a power cut or ``kill -9`` would at that step.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from node.recovery_server import RecoveryServer
from node.storage.fileio import CRASH_POINTS, StorageFaults

#: The environment variable that names the crash point.
CRASH_AT = "FRREP_TEST_CRASH_AT"


def arm(name: str) -> None:
    """Make every recovery server made from now on die at crash point ``name``."""
    if name not in CRASH_POINTS:
        raise ValueError(f"no crash point {name!r}")

    def crash(point: str) -> None:
        if point == name:
            os.kill(os.getpid(), signal.SIGKILL)

    real_init = RecoveryServer.__init__

    def init(self: RecoveryServer, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("faults", StorageFaults(crash_point=crash))
        real_init(self, *args, **kwargs)

    RecoveryServer.__init__ = init  # type: ignore[method-assign]


if __name__ == "__main__":
    at = os.environ.get(CRASH_AT)
    if at:
        arm(at)
    from frctl import run

    run()

"""A blocking QMP client: ``qemu.qmp``'s asyncio client run on an event loop of its own.

The primary is Trio; ``qemu.qmp`` is asyncio. Rather than mixing loops in one thread, each
:class:`QMPConnection` runs an asyncio loop in a daemon thread and hands it coroutines
with ``run_coroutine_threadsafe``; its methods block, and the change source calls them
from ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from ..disks import DiskUnavailable

T = TypeVar("T")

#: How long one QMP command may take before the cycle gives up on QEMU.
COMMAND_TIMEOUT = 30.0


class QemuError(DiskUnavailable):
    """QEMU refused a command (its ``desc`` is in the message). The cycle fails as one
    whose disk cannot be read (a later cycle tries again after the cleanup)."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command, self.desc = command, desc


class QemuUnavailable(DiskUnavailable):
    """QEMU's monitor cannot be reached (not running, wrong socket): the cycle fails as a
    disk that is not there does, and a later one tries again."""


class QMPConnection:
    """One QMP session with QEMU at a UNIX socket, used from any one thread at a time."""

    def __init__(self, socket_path: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        self.socket_path, self.timeout = socket_path, timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="frrep-qmp", daemon=True
        )
        self._thread.start()
        self._client = QMPClient("frrep")
        try:
            self._run(self._client.connect(socket_path))
        except (ConnectError, OSError, TimeoutError) as exc:
            self._stop_loop()
            raise QemuUnavailable(
                f"QEMU's monitor at {socket_path} cannot be reached: {exc}"
            ) from None

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout)

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one command and return its ``return`` value.

        Raises:
            QemuError: QEMU answered with an error.
            QemuUnavailable: the connection broke or QEMU did not answer in time.
        """
        try:
            return self._run(self._client.execute(command, arguments))
        except ExecuteError as exc:
            raise QemuError(command, exc.error.error.desc) from None
        except (QMPError, OSError, TimeoutError, EOFError) as exc:
            raise QemuUnavailable(
                f"QEMU's monitor at {self.socket_path} failed during {command}: {exc!r}"
            ) from None

    def close(self) -> None:
        """Disconnect and stop the loop's thread."""
        with contextlib.suppress(Exception):  # a broken session: nothing to keep
            self._run(self._client.disconnect())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

"""systemd's readiness protocol (``Type=notify``), without a dependency.

``sd_notify("READY=1")`` sends one datagram to the socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace), as ``sd_notify(3)`` does. Outside
systemd the variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("frrep.systemd")


def sd_notify(state: str) -> bool:
    """Tell systemd ``state`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``); True if
    sent, False when not run by systemd or the socket refused it (logged)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)
        return False
    return True

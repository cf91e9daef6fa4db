"""A blocking TLS pipe over OpenSSL's memory BIOs, for bench/delta_floor.py's floor.

The stdlib's ``SSLSocket`` reads one TLS record (at most 16 KiB) per ``recv_into`` call,
and OpenSSL's socket BIO reads each record in two system calls: a receiver built on it
spends more time in calls than in decryption, and a floor built on it was slower than
the cycle it was meant to bound. Here the socket is read and written in large pieces (1
MiB) and OpenSSL works on memory only, as frlink.biotls does for the product, so the
floor pays for the encryption and the copies, not for a slow use of the API.
"""

from __future__ import annotations

import socket
import ssl
from typing import cast

#: Bytes read from the socket at a time, and plaintext handed to OpenSSL at a time.
PIECE = 1 << 20


class BioPipe:
    """One end of a TLS connection on a connected blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._raw = bytearray(PIECE)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        k = self.sock.recv_into(self._raw)
        if not k:
            raise ConnectionError("the TLS pipe's peer closed")
        self.incoming.write(memoryview(self._raw)[:k])

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it, at most ``PIECE`` of plaintext per socket write."""
        view = memoryview(data).cast("B")
        for lo in range(0, len(view), PIECE):
            self.tls.write(view[lo : lo + PIECE])
            self._flush()

    def recv_into(self, view: memoryview) -> int:
        """Decrypt into ``view``: every record already received, reading the socket only
        when none is; the bytes written (0 only for an empty ``view``)."""
        got = 0
        while got < len(view):
            try:
                # With a buffer, read() returns the count (typeshed says bytes).
                got += cast(int, self.tls.read(len(view) - got, view[got:]))
            except ssl.SSLWantReadError:
                if got:
                    return got
                self._flush()  # TLS 1.3 session tickets and the like
                self._fill()
        return got

"""The in-run floor of a delta cycle (bench/delta.py): only the work no design can avoid.

For one change set (the changed 64 KiB blocks of an image), a plain program that

1. reads the changed blocks from the image (one ``pread`` each, into one buffer);
2. writes them once to a log file with one data sync (the primary must keep what it
   captured until the recovery side has it: a VM may run on meanwhile), starting the
   write-back of each 8 MiB as it goes (``node/writeback.py``, as the product does);
3. sends them (a header of their offsets, then the data) over TLS (the same certificates
   and cipher as the IR baseline of bench/ir.py) over loopback, from this process to a
   receiver process, PRIMARY_HOST to SERVER_HOST, the handshake included; the TLS is
   OpenSSL on memory BIOs with 1 MiB socket reads and writes (``bio_pipe.py``): the
   stdlib's TLS socket, one record per call, was slower than the cycle it bounds;
4. in the receiver: writes them once to a journal as they arrive (the write-back of each
   8 MiB started likewise) and syncs it once
   (the recovery side must have them durably before it says so), then writes them once
   into the image at their offsets, and answers one byte.

No digest, no framing, no undo data, no state file, no event loop: a lower bound for
this machine, measured in the same run as the cycle it bounds. The log and the journal
are preallocated and written over (as a design may do; writing into fresh files costs
block allocation), the image is a full copy (its blocks allocated, as a replica's are),
and both sides' buffers are made and their pages touched before the clock starts (a
design keeps its buffers from batch to batch: fresh ones cost ~50k page faults here).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bio_pipe import BioPipe
from ir import BLOCK, MIB, PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME, BenchSite

from frlink.tls import client_context
from node.writeback import start_writeback

#: Bytes written between two starts of their write-back to disk (as the product does:
#: node/writeback.py), so that each sync waits only for the tail.
WRITEBACK = 8 << 20

#: The receiver, run as ``python -c`` (the repository root on sys.path): listens, prints
#: its port, serves one connection, prints its timestamps.
_RECEIVER = r"""
import os, socket, struct, sys, time
from pathlib import Path
from frlink.tls import server_context
sys.path.insert(0, "bench")
from bio_pipe import BioPipe
from node.writeback import start_writeback
WRITEBACK = 8 << 20
cert, key, ca, host, journal, image = sys.argv[1:7]
block, capacity = int(sys.argv[7]), int(sys.argv[8])
# The receive buffer is made and its pages touched before the clock starts: a design keeps
# its buffers from batch to batch and pays no page faults for them.
buffer = bytearray(b"\x01") * capacity
ctx = server_context(Path(cert), Path(key), Path(ca))
listener = socket.create_server((host, 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
tls = BioPipe(conn, ctx, server_side=True)
began = time.time()
began_cpu = time.thread_time()  # this receiver's one thread, as the server's Trio thread

def exactly(n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = tls.recv_into(view[got:])
        if not k:
            raise SystemExit("short stream")
        got += k
    return buf

(count,) = struct.unpack(">Q", exactly(8))
offsets = struct.unpack(f">{count}Q", exactly(8 * count))
view = memoryview(buffer)[: count * block]
data = view
jfd = os.open(journal, os.O_WRONLY)
got = written = kicked = 0
while got < len(data):
    k = tls.recv_into(view[got:got + (1 << 20)])  # every record there, up to 1 MiB
    if not k:
        raise SystemExit("short stream")
    got += k
    if got - written >= (1 << 20) or got == len(data):
        os.pwrite(jfd, view[written:got], written)  # journaled as it arrives, 1 MiB a write
        written = got
        if written - kicked >= WRITEBACK or written == len(data):
            start_writeback(jfd, kicked, written - kicked)  # to disk while the rest comes
            kicked = written
received = time.time()
receive_cpu = time.thread_time() - began_cpu
os.fdatasync(jfd)
os.close(jfd)
durable = time.time()
ifd = os.open(image, os.O_WRONLY)
for i, off in enumerate(offsets):
    os.pwrite(ifd, view[i * block:(i + 1) * block], off)
os.close(ifd)
applied = time.time()
tls.sendall(b"A")
conn.close()
print(began, received, durable, applied, receive_cpu, flush=True)
"""


@dataclass
class FloorResult:
    """One floor run: its wall time and when it passed each step (``time.time()``)."""

    seconds: float
    times: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of the receiver's thread from the connection to the last byte.
    receive_cpu: float = 0.0
    #: CPU seconds of the sender's thread from the connection to the answer.
    send_cpu: float = 0.0

    def phases(self) -> dict[str, float]:
        """Seconds per step, in the order they run."""
        t = self.times
        return {
            "read": t["read"] - t["start"],
            "log_durable": t["logged"] - t["read"],
            "connect": t["connected"] - t["logged"],
            "send_receive": t["received"] - t["connected"],
            "journal_durable": t["durable"] - t["received"],
            "image_write": t["applied"] - t["durable"],
            "answer": t["answered"] - t["applied"],
        }


class Floor:
    """The floor's files under ``root`` for change sets of ``payload`` bytes, and a copy of
    ``image`` as its target; :meth:`run` measures one change set."""

    def __init__(self, site: BenchSite, root: Path, image: Path, payload: int) -> None:
        self.site = site
        self.payload = payload
        # Kept from run to run, its pages touched now: see the receiver's buffer.
        self.buffer = bytearray(b"\x01") * payload
        self.log = root / "floor-log"
        self.journal = root / "floor-journal"
        self.image = root / "floor-image.img"
        for path in (self.log, self.journal):
            _preallocate(path, payload)
        with image.open("rb") as src, self.image.open("wb") as dst:
            while piece := src.read(8 * MIB):
                dst.write(piece)
            os.fsync(dst.fileno())

    def run(self, source: Path, blocks: list[int]) -> FloorResult:
        """Read ``blocks`` of ``source``, log, send, journal and write them; timed."""
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _RECEIVER,
                *map(str, self.site.cert(SERVER_NAME)),
                SERVER_HOST,
                str(self.journal),
                str(self.image),
                str(BLOCK),
                str(self.payload),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert receiver.stdout is not None
            port = int(receiver.stdout.readline())
            ctx = client_context(*self.site.cert(PRIMARY_NAME))
            times: dict[str, float] = {}
            start = time.perf_counter()
            times["start"] = time.time()
            view = memoryview(self.buffer)[: len(blocks) * BLOCK]
            data = view
            fd = os.open(source, os.O_RDONLY)
            try:
                for i, b in enumerate(blocks):
                    os.preadv(fd, [view[i * BLOCK : (i + 1) * BLOCK]], b * BLOCK)
            finally:
                os.close(fd)
            times["read"] = time.time()
            log = os.open(self.log, os.O_WRONLY)
            try:
                for lo in range(0, len(data), WRITEBACK):
                    os.pwrite(log, data[lo : lo + WRITEBACK], lo)
                    start_writeback(log, lo, min(WRITEBACK, len(data) - lo))
                os.fdatasync(log)
            finally:
                os.close(log)
            times["logged"] = time.time()
            send_cpu0 = time.thread_time()
            raw = socket.create_connection((SERVER_HOST, port), source_address=(PRIMARY_HOST, 0))
            with raw:
                tls = BioPipe(raw, ctx, server_hostname=SERVER_NAME)
                times["connected"] = time.time()
                header = struct.pack(f">Q{len(blocks)}Q", len(blocks), *(b * BLOCK for b in blocks))
                tls.sendall(header)
                tls.sendall(view)  # 1 MiB of plaintext per socket write
                answer = bytearray(1)
                if tls.recv_into(memoryview(answer)) != 1 or answer != b"A":
                    raise RuntimeError("the floor's receiver did not answer")
                times["answered"] = time.time()
                seconds = time.perf_counter() - start
                send_cpu = time.thread_time() - send_cpu0
            report = receiver.stdout.readline().split()
            began, received, durable, applied, receive_cpu = map(float, report)
            times.update(began=began, received=received, durable=durable, applied=applied)
            return FloorResult(seconds, times, receive_cpu, send_cpu)
        finally:
            receiver.wait(timeout=30)


def _preallocate(path: Path, size: int) -> None:
    """A file of ``size`` bytes whose blocks are allocated and written (zeros), durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        zeros = bytes(MIB)
        for lo in range(0, size, MIB):
            os.pwrite(fd, zeros[: min(MIB, size - lo)], lo)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_digest_seconds(image: Path, size: int, threads: int) -> float:
    """Seconds to read ``size`` bytes of ``image`` and digest every 64 KiB block once
    (XXH3-128, as a digest scan must), in ``threads`` threads each taking an equal share
    of the image in 4 MiB reads: the part of a scan cycle no design can avoid."""
    import threading

    import xxhash

    share = -(-size // threads // BLOCK) * BLOCK

    def work(start: int, end: int) -> None:
        buffer = memoryview(bytearray(4 * MIB))
        digest = xxhash.xxh3_128_digest
        fd = os.open(image, os.O_RDONLY)
        try:
            offset = start
            while offset < end:
                got = os.preadv(fd, [buffer[: min(len(buffer), end - offset)]], offset)
                if not got:
                    break
                for at in range(0, got, BLOCK):
                    digest(buffer[at : min(at + BLOCK, got)])
                offset += got
        finally:
            os.close(fd)

    workers = [
        threading.Thread(target=work, args=(i * share, min(size, (i + 1) * share)))
        for i in range(threads)
    ]
    began = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began


def read_digest_floor(image: Path, size: int) -> float:
    """The faster of one and two threads (this machine has two cores) reading and
    digesting the whole image: the scan's own floor (see :func:`read_digest_seconds`)."""
    return min(read_digest_seconds(image, size, 1), read_digest_seconds(image, size, 2))

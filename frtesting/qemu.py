"""A QEMU that serves a VM's disks, for tests and benchmarks: ``qemu-storage-daemon``.

:class:`QemuDaemon` starts ``qemu-storage-daemon`` (Debian's ``qemu-system-common``) with
one block node per disk image (raw or qcow2), a QMP monitor on a UNIX socket, and an NBD
server whose writable exports ``guest-<node>`` stand in for the guest: a
:class:`GuestWriter` writes through them, so every write goes through QEMU's block layer
and its dirty bitmaps, as a running guest's would. No KVM is needed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Debian package of each program the QEMU tests need.
PACKAGES = {
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-img": "qemu-utils",
}


def missing_qemu() -> str | None:
    """What is missing to run a :class:`QemuDaemon` (naming the Debian package), or None."""
    for program, package in PACKAGES.items():
        if shutil.which(program) is None:
            return f"{program} is not installed: apt-get install {package}"
    try:
        import nbd  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return (
            "libnbd's Python binding is not importable: apt-get install python3-libnbd "
            "(then scripts/bootstrap links it into .venv)"
        )
    return None


def create_image(path: Path, size: int, fmt: str) -> Path:
    """A new, empty image of ``size`` bytes in ``fmt`` (``raw`` or ``qcow2``)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True, timeout=30
    )
    return path


@dataclass
class Disk:
    """One disk of the VM: its block node name, image and format."""

    node: str
    image: Path
    fmt: str


@dataclass
class QemuDaemon:
    """A running ``qemu-storage-daemon`` serving ``disks``."""

    root: Path
    disks: Sequence[Disk]
    #: Start QEMU's NBD server with the guest's exports (else frrep starts its own).
    guest_nbd: bool = True
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "qsd.log"

    @property
    def qmp_socket(self) -> str:
        return str(self.root / "qmp.sock")

    @property
    def nbd_socket(self) -> str:
        return str(self.root / "nbd.sock")

    def start(self) -> QemuDaemon:
        """Start the daemon and wait for its sockets."""
        for sock in (self.qmp_socket, self.nbd_socket):
            Path(sock).unlink(missing_ok=True)
        args = ["qemu-storage-daemon"]
        for d in self.disks:
            args += [
                "--blockdev",
                f"driver={d.fmt},node-name={d.node},file.driver=file,file.filename={d.image}",
            ]
        args += [
            "--chardev",
            f"socket,id=mon,path={self.qmp_socket},server=on,wait=off",
            "--monitor",
            "chardev=mon",
        ]
        if not self.guest_nbd:
            return self._spawn(args)
        args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for d in self.disks:
            args += [
                "--export",
                f"type=nbd,id=guest-{d.node},node-name={d.node},name=guest-{d.node},writable=on",
            ]
        return self._spawn(args)

    def _spawn(self, args: list[str]) -> QemuDaemon:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        sockets = [self.qmp_socket] + ([self.nbd_socket] if self.guest_nbd else [])
        while not all(os.path.exists(s) for s in sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command (a session of its own)."""
        from node.primary.qemu.qmp import QMPConnection

        conn = QMPConnection(self.qmp_socket)
        try:
            return conn.execute(command, arguments)
        finally:
            conn.close()

    def kill(self) -> None:
        """kill -9, as a crashed QEMU."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop it cleanly (persistent bitmaps are written to their qcow2 images)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def writer(self, node: str) -> GuestWriter:
        """A guest writing to the disk of ``node`` through QEMU."""
        return GuestWriter(self.nbd_socket, f"guest-{node}")


class GuestWriter:
    """Writes to one disk through QEMU's NBD export, as the guest would."""

    def __init__(self, socket_path: str, export: str) -> None:
        import nbd

        self._h = nbd.NBD()
        self._h.set_export_name(export)
        self._h.connect_unix(socket_path)
        self.size: int = self._h.get_size()

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (acknowledged by QEMU on return)."""
        self._h.pwrite(data, offset)

    def read(self, offset: int, length: int) -> bytes:
        """What the guest reads now (in requests of at most 32 MiB, QEMU's bound)."""
        step = 32 * 1024 * 1024
        return b"".join(
            bytes(self._h.pread(min(step, offset + length - at), at))
            for at in range(offset, offset + length, step)
        )

    def random_writes(self, rng: random.Random, count: int, *, max_len: int = 200_000) -> None:
        """``count`` writes of random data at random places."""
        for _ in range(count):
            length = rng.randrange(512, max_len)
            self.write(rng.randrange(0, self.size - length), rng.randbytes(length))

    def close(self) -> None:
        """Flush and disconnect."""
        self._h.flush()
        self._h.shutdown()


class BackgroundWriter:
    """A thread writing continuously at random places (the guest keeps running)."""

    def __init__(self, writers: Sequence[GuestWriter], seed: int) -> None:
        self._writers, self._rng = list(writers), random.Random(seed)
        self._stop = threading.Event()
        self.writes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._rng.choice(self._writers).random_writes(self._rng, 1, max_len=100_000)
            self.writes += 1
            time.sleep(0.002)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

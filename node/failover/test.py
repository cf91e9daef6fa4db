"""Test failover: a VM built from a kept recovery point in a place of its own, while
replication goes on; one command removes it.

The VM's config blob and disks are copied out as of the point
(``node/storage/point_copy.py``) into a new directory, which is marked as a test
failover (``TEST_MARKER``: the cleanup removes only such directories). A hook then tells
the embedding hypervisor tool to start the VM from those disks; the reference hook runs
a configured command with the directory and the disk paths in its environment. The
cleanup runs the stop hook first, then removes the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import frproto
from node.storage.point_copy import PointCopy, copy_point

#: The file that marks a directory as a test failover's (and says of what).
TEST_MARKER = "frrep-test-failover.json"


class HookFailed(Exception):
    """The embedding tool's hook command failed."""


@dataclass(frozen=True)
class CommandHook:
    """The reference hook: runs ``command`` through the shell, with ``FRREP_VM_DIR``,
    ``FRREP_VMID``, ``FRREP_SEQUENCE``, ``FRREP_CONFIG`` and ``FRREP_DISKS``
    (colon-separated image paths) in its environment."""

    command: str

    def __call__(self, copy: PointCopy) -> None:
        env = {
            **os.environ,
            "FRREP_VM_DIR": str(copy.directory),
            "FRREP_VMID": str(copy.vmid),
            "FRREP_SEQUENCE": str(copy.sequence),
            "FRREP_CONFIG": str(copy.config),
            "FRREP_DISKS": ":".join(str(p) for p in copy.disks),
        }
        done = subprocess.run(self.command, shell=True, env=env, check=False, capture_output=True)
        if done.returncode:
            raise HookFailed(
                f"hook {self.command!r} exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )


def find_replica(storages: list[Path], vmid: uuid.UUID) -> Path:
    """The storage location (of ``storages``) that holds the replica of ``vmid``."""
    for storage in storages:
        if (storage / str(vmid) / "state.json").exists():
            return storage
    raise frproto.UnknownVM(f"no replica of {vmid} in {', '.join(map(str, storages))}")


def start_test_failover(
    storages: list[Path],
    vmid: uuid.UUID,
    out: Path,
    *,
    sequence: int | None = None,
    start: CommandHook | None = None,
) -> PointCopy:
    """Build the test VM in ``out`` (a new directory) and run the start hook, if any. On a
    failed hook the directory is left, for the cleanup (or a person) to look at."""
    copy = copy_point(find_replica(storages, vmid), vmid, out, sequence=sequence)
    marker = {"vmid": str(vmid), "sequence": copy.sequence, "disks": [str(p) for p in copy.disks]}
    (out / TEST_MARKER).write_text(json.dumps(marker) + "\n")
    if start is not None:
        start(copy)
    return copy


def clean_up_test_failover(directory: Path, *, stop: CommandHook | None = None) -> None:
    """Run the stop hook, then remove a test failover's directory (only one marked so).

    Raises:
        ValueError: ``directory`` is not a test failover's.
    """
    marker = directory / TEST_MARKER
    if not marker.is_file():
        raise ValueError(f"{directory} is not a test failover's directory (no {TEST_MARKER})")
    doc = json.loads(marker.read_text())
    if stop is not None:
        disks = tuple(Path(p) for p in doc.get("disks", []))
        stop(
            PointCopy(
                uuid.UUID(doc["vmid"]),
                int(doc["sequence"]),
                directory,
                directory / "config.bin",
                disks,
                0,
                0.0,
            )
        )
    shutil.rmtree(directory)

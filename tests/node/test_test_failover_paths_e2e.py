"""Test failover and its cleanup, driven as an operator drives them: ``frctl`` processes
run from the configuration's own directory with a relative ``--config`` (issue 12, item
7), a copy that fails part way for lack of room, and what an earlier version left behind.

A real recovery server process and a primary on loopback make the replica; every
``frctl`` is a separate process with its own working directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.server import ServerProcess
from node.failover.test import TEST_MARKER
from node.storage.point_copy import copy_point

from .site import Site
from .test_replication_e2e import MIB, make_image, scribble

#: Bytes a process limited by ``ulimit -f`` may write to one file (the shell counts KiB).
FILE_LIMIT_KIB = 1024


def frctl_in(
    cwd: Path, *args: str, file_limit_kib: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``frctl`` in ``cwd``, as an operator in that directory would.

    ``file_limit_kib``: the largest file the process may write (``ulimit -f``), as a quota
    or a nearly full file system would have it; Python ignores SIGXFSZ, so a write past
    it fails with EFBIG instead of killing the process.
    """
    command = [sys.executable, "-m", "frctl.main", *args]
    if file_limit_kib is not None:
        command = ["sh", "-c", f'ulimit -f {file_limit_kib} && exec "$0" "$@"', *command]
    return subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    proc = site.start_server()
    yield proc
    proc.stop()


def replicate(
    site: Site, server: ServerProcess, seed: int, sizes: list[int], cycles: int
) -> tuple[uuid.UUID, list[Path], dict[int, list[bytes]]]:
    """A VM replicated for ``cycles`` cycles after its IR; its disks at every point."""
    rng = random.Random(seed)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    images = [make_image(site.root / f"disk{i}.img", size, rng) for i, size in enumerate(sizes)]
    vm = site.replicator(vmid, "vm", images, server.port)
    points: dict[int, list[bytes]] = {}

    async def run() -> None:
        with trio.fail_after(60):
            await vm.cycle()  # IR: point 0
            points[vm.state.sequence] = [p.read_bytes() for p in images]
            for _ in range(cycles):
                for image in images:
                    scribble(image, rng, writes=6)
                await vm.cycle()
                points[vm.state.sequence] = [p.read_bytes() for p in images]

    trio.run(run)
    return vmid, images, points


def leftovers(directory: Path) -> list[str]:
    """Names in ``directory`` a test failover may have made (staging directories too)."""
    return sorted(n for n in os.listdir(directory) if "tfo" in n or "frrep" in n)


def test_a_relative_config_works_as_an_absolute_one(site: Site, server: ServerProcess) -> None:
    vmid, images, points = replicate(site, server, 71, [2 * MIB], cycles=3)
    assert sorted(points) == [0, 1, 2, 3]
    # An older point needs the undo data of the newer ones: files under the storage root,
    # which the copy checks are inside it.
    for point in ("1", None):
        name = f"tfo-{point or 'latest'}"
        extra = ["--point", point] if point else []
        done = frctl_in(
            site.root, "failover", "test", "--config", "server.toml", str(vmid),
            "--out", name, *extra, "--json",
            "--start-command", f'echo "$FRREP_VM_DIR:$FRREP_DISKS" > {name}.started',
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        out = site.root / name
        assert result["directory"] == str(out)
        assert result["sequence"] == (int(point) if point else 3)
        disk = out / "disks" / "disk0.img"
        assert result["disks"] == [str(disk)]
        assert disk.read_bytes() == points[result["sequence"]][0]
        assert (out / TEST_MARKER).is_file()
        # The hook may run anywhere: it is given absolute paths.
        assert (site.root / f"{name}.started").read_text().strip() == f"{out}:{disk}"
    # The same point with an absolute --config, from another directory: the same copy.
    elsewhere = site.root / "elsewhere"
    elsewhere.mkdir()
    done = frctl_in(
        elsewhere, "failover", "test", "--config", str(site.server_config), str(vmid),
        "--out", str(site.root / "tfo-abs"), "--point", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    copied = (site.root / "tfo-abs" / "disks" / "disk0.img").read_bytes()
    assert copied == (site.root / "tfo-1" / "disks" / "disk0.img").read_bytes()
    # Replication went on: the replica is still the primary's latest cycle.
    assert site.replica_image(vmid, 0).read_bytes() == images[0].read_bytes()


def test_cleanup_after_a_relative_config_test_failover(site: Site, server: ServerProcess) -> None:
    vmid, _, points = replicate(site, server, 72, [2 * MIB], cycles=2)
    done = frctl_in(
        site.root, "failover", "test", "--config", "server.toml", str(vmid),
        "--out", "tfo", "--point", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = site.root / "tfo"
    assert (out / "disks" / "disk0.img").read_bytes() == points[0][0]
    # Relative again, with the stop hook: it sees the directory as the start hook did.
    stopped = site.root / "stopped.txt"
    cleaned = frctl_in(
        site.root, "failover", "cleanup", "tfo",
        "--stop-command", f'echo "$FRREP_VM_DIR:$FRREP_DISKS" > {stopped}',
    )  # fmt: skip
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed the test failover in {out}" in cleaned.stdout
    assert stopped.read_text().strip() == f"{out}:{out / 'disks' / 'disk0.img'}"
    assert not out.exists()
    assert leftovers(site.root) == []
    # The replica itself is untouched by the cleanup.
    assert (site.storage / str(vmid) / "state.json").is_file()


def test_a_test_failover_failing_part_way_leaves_nothing(site: Site, server: ServerProcess) -> None:
    # disk0 fits under the file size limit, disk1 does not: the copy fails after writing
    # the config blob and a whole disk.
    vmid, _, points = replicate(site, server, 73, [MIB // 2, 3 * MIB], cycles=1)
    parent = site.root / "tests-vms"  # not there yet: the test failover makes it
    out = parent / "tfo"
    args = ["failover", "test", "--config", str(site.server_config), str(vmid)]
    failed = frctl_in(site.root, *args, "--out", str(out), file_limit_kib=FILE_LIMIT_KIB)
    assert failed.returncode == 1
    assert "File too large" in failed.stderr
    assert not out.exists(), sorted(str(p) for p in parent.rglob("*"))
    assert not parent.exists()  # the directory it made for the copy is gone too
    assert leftovers(site.root) == []
    nothing = frctl_in(site.root, "failover", "cleanup", str(out))
    assert nothing.returncode == 1
    assert "nothing to clean up" in nothing.stderr
    # Nothing is in the way of trying again with room to write.
    again = frctl_in(site.root, *args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    for index in (0, 1):
        assert (out / "disks" / f"disk{index}.img").read_bytes() == points[1][index]
    assert frctl_in(site.root, "failover", "cleanup", str(out)).returncode == 0
    assert not out.exists()


def test_cleanup_removes_what_an_earlier_version_left_and_refuses_path_tricks(
    site: Site, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmid, _, _ = replicate(site, server, 74, [2 * MIB], cycles=1)
    # What an earlier version left: it copied with the relative storage root as given,
    # failed on the first undo file and left the directory, unmarked.
    monkeypatch.chdir(site.root)
    for name in ("tfo-old", "tfo-old-2"):
        with pytest.raises(fp.InternalError, match="outside the storage root"):
            copy_point(Path("replicas"), vmid, Path(name), sequence=0)
        assert sorted(os.listdir(name)) == ["config.bin", "disks"]
    left = site.root / "tfo-old"
    done = frctl_in(site.root, "failover", "cleanup", "tfo-old")
    assert done.returncode == 0, done.stderr
    assert not left.exists()
    # A symlink to such a directory is not followed: the cleanup wants the directory.
    link = site.root / "tfo-link"
    link.symlink_to(site.root / "tfo-old-2")
    refused = frctl_in(site.root, "failover", "cleanup", "tfo-link")
    assert refused.returncode == 1
    assert "symlink" in refused.stderr
    assert (site.root / "tfo-old-2" / "disks").is_dir()

    # The replica's own directory, or its storage root reached through '..', is no test
    # failover's.
    for target in (f"replicas/{vmid}", f"replicas/{vmid}/.."):
        refused = frctl_in(site.root, "failover", "cleanup", target)
        assert refused.returncode == 1
        assert "not a test failover" in refused.stderr
    assert (site.storage / str(vmid) / "state.json").is_file()

    # An unmarked directory with a symlink among its disks is not a copy's.
    outside = site.root / "precious.img"
    outside.write_bytes(b"keep me")
    tricked = site.root / "tfo-symlink"
    (tricked / "disks").mkdir(parents=True)
    (tricked / "config.bin").write_bytes(b"")
    (tricked / "disks" / "disk0.img").symlink_to(outside)
    refused = frctl_in(site.root, "failover", "cleanup", str(tricked))
    assert refused.returncode == 1
    assert "not a test failover" in refused.stderr
    assert tricked.is_dir()

    # A marker naming a disk outside its directory: the stop hook is not handed it.
    marked = site.root / "tfo-marked"
    (marked / "disks").mkdir(parents=True)
    marker = {"vmid": str(vmid), "sequence": 1, "disks": ["../../precious.img"]}
    (marked / TEST_MARKER).write_text(json.dumps(marker))
    stopped = site.root / "stopped.txt"
    refused = frctl_in(
        site.root, "failover", "cleanup", str(marked), "--stop-command", f"touch {stopped}"
    )
    assert refused.returncode == 1
    assert "outside" in refused.stderr
    assert not stopped.exists()
    assert marked.is_dir()
    assert outside.read_bytes() == b"keep me"

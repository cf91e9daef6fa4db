"""``[primary] max_sessions``: the VMs of one primary service take turns, at most that
many cycles (each a connection and its buffers) at once (bench/scale.py: 500 VMs)."""

from __future__ import annotations

import errno
import os
import ssl
import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from node.primary.config import DEFAULT_MAX_SESSIONS, ConfigError, load_primary_config
from node.primary.durable import OSFiles, using
from node.primary.replicator import VMReplicator
from node.primary.state import PrimaryStateStore, VMReplicationState


async def _most_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sessions: trio.CapacityLimiter | None
) -> int:
    """Run 5 VMs' replicators until 20 cycles ended; the most that ran at once."""
    store = PrimaryStateStore(tmp_path / "state")
    running = most = ended = 0
    all_done = trio.Event()

    async def cycle() -> None:
        nonlocal running, most, ended
        running += 1
        most = max(most, running)
        await trio.sleep(0.02)  # a cycle's connection and batch
        running -= 1
        ended += 1
        if ended >= 20:
            all_done.set()

    replicators = []
    for i in range(5):
        image = tmp_path / f"vm{i}.img"
        image.write_bytes(bytes(65536))
        state = VMReplicationState(
            vmid=str(uuid.uuid4()),
            name=f"vm{i}",
            disks=[{"disk_id": "disk0", "path": str(image), "size": 65536}],
            frequency_s=0.001,
        )
        store.save(state)
        replicator = VMReplicator(state, store, ssl.create_default_context(), sessions=sessions)
        monkeypatch.setattr(replicator, "cycle", cycle)
        replicators.append(replicator)
    async with trio.open_nursery() as nursery:
        for replicator in replicators:
            nursery.start_soon(replicator.run)
        with trio.fail_after(20):
            await all_done.wait()
        nursery.cancel_scope.cancel()
    return most


async def test_a_service_runs_at_most_max_sessions_cycles_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await _most_at_once(tmp_path, monkeypatch, trio.CapacityLimiter(2)) == 2


async def test_without_a_bound_every_vm_cycles_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control: the bound above is what kept them to 2.
    assert await _most_at_once(tmp_path, monkeypatch, None) == 5


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "primary.toml"
    path.write_text(
        f"""
[primary]
name = "p1.example.com"
state_dir = "state"
{extra}

[tls]
cert = "c.pem"
key = "k.pem"
ca = "ca.pem"
"""
    )
    return path


def test_max_sessions_is_read_with_a_default(tmp_path: Path) -> None:
    assert load_primary_config(_config(tmp_path)).max_sessions == DEFAULT_MAX_SESSIONS
    assert load_primary_config(_config(tmp_path, "max_sessions = 3")).max_sessions == 3


@pytest.mark.parametrize("value", ["0", "true", "2.5", "10001"])
def test_max_sessions_out_of_range_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="max_sessions"):
        load_primary_config(_config(tmp_path, f"max_sessions = {value}"))


class _FullDisk(OSFiles):
    """The primary's state disk, full from the moment ``full`` is set."""

    def __init__(self) -> None:
        self.full = False

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return super().open(path, flags, mode)


async def test_a_state_save_failing_after_a_cycle_does_not_end_the_replicator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Found by the simulation (docs/simulation.md): the save of the next cycle's time after
    # each cycle was outside the cycle's error handling, so a full state disk (ENOSPC)
    # escaped VMReplicator.run and ended the primary service, every VM with it.
    store = PrimaryStateStore(tmp_path / "state")
    image = tmp_path / "vm.img"
    image.write_bytes(bytes(65536))
    state = VMReplicationState(
        vmid=str(uuid.uuid4()),
        name="vm",
        disks=[{"disk_id": "disk0", "path": str(image), "size": 65536}],
        frequency_s=10.0,
    )
    store.save(state)
    files = _FullDisk()
    cycles = 0

    async def cycle() -> None:
        nonlocal cycles
        cycles += 1
        files.full = True  # the disk fills during the first cycle and stays full

    with using(files):
        replicator = VMReplicator(state, store, ssl.create_default_context())
        monkeypatch.setattr(replicator, "cycle", cycle)
        with trio.move_on_after(60):
            await replicator.run()
    assert cycles >= 5  # it kept cycling (every 10 s), the saves failing meanwhile

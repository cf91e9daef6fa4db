"""``[primary] max_sessions``: the VMs of one primary service take turns, at most that
many cycles (each a connection and its buffers) at once (bench/scale.py: 500 VMs)."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path

import pytest
import trio

from node.primary.config import DEFAULT_MAX_SESSIONS, ConfigError, load_primary_config
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

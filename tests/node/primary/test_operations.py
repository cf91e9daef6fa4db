"""node.primary.operations: the operator's actions as a library (what frctl calls)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from node.primary.locks import cycle_lock
from node.primary.operations import (
    CycleStillRuns,
    EnableRequest,
    NotEnabled,
    Refused,
    disable,
    enable,
    find_vm,
    ir_percent,
    set_limits,
    set_paused,
    wait_for_cycle,
)
from node.primary.state import Health, IRStage, PrimaryStateStore, VMReplicationState


@pytest.fixture
def store(tmp_path: Path) -> PrimaryStateStore:
    return PrimaryStateStore(tmp_path / "state")


def _image(tmp_path: Path, name: str = "d0.raw", size: int = 1 << 20) -> Path:
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    return path


def _request(tmp_path: Path, **changes: object) -> EnableRequest:
    fields: dict[str, object] = {
        "vmid": str(uuid.uuid4()),
        "name": "web01",
        "disk_specs": [f"d0={_image(tmp_path)}"],
        "server": "r1.test:7443",
    }
    fields.update(changes)
    return EnableRequest(**fields)  # type: ignore[arg-type]


def test_enable_writes_a_state_that_starts_with_the_ir(
    store: PrimaryStateStore, tmp_path: Path
) -> None:
    state = enable(store, _request(tmp_path, frequency_s=30.0, bandwidth_bps=1e6))
    loaded = store.load(state.vmid)
    assert loaded.ir_state == IRStage.NOT_STARTED
    assert loaded.health == Health.INITIAL_REPLICATION
    assert (loaded.recovery_host, loaded.recovery_port, loaded.server_name) == (
        "r1.test",
        7443,
        "r1.test",
    )
    assert loaded.disks == [{"disk_id": "d0", "path": str(tmp_path / "d0.raw"), "size": 1 << 20}]
    assert (loaded.frequency_s, loaded.bandwidth_bps) == (30.0, 1e6)
    assert ir_percent(loaded) == 0.0


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"vmid": "not-a-guid"}, "is not a GUID"),
        ({"disk_specs": ["d0"]}, "use ID=PATH"),
        ({"disk_specs": ["d0=/nonexistent/x.raw"]}, "use ID=PATH to an existing image"),
        ({"server": "r1.test"}, "use HOST:PORT"),
        ({"server": "r1.test:70000"}, "use HOST:PORT"),
        ({"name": "x" * 5000}, "VM name must be 1-255 bytes"),
    ],
)
def test_enable_refuses_bad_input_and_writes_nothing(
    store: PrimaryStateStore, tmp_path: Path, changes: dict[str, object], said: str
) -> None:
    with pytest.raises(Refused, match=said):
        enable(store, _request(tmp_path, **changes))
    assert store.all() == []


def test_enable_refuses_an_empty_image(store: PrimaryStateStore, tmp_path: Path) -> None:
    empty = _image(tmp_path, "empty.raw", 0)
    with pytest.raises(Refused, match="is empty"):
        enable(store, _request(tmp_path, disk_specs=[f"d0={empty}"]))


def test_enable_refuses_a_vm_or_a_disk_already_enabled(
    store: PrimaryStateStore, tmp_path: Path
) -> None:
    first = enable(store, _request(tmp_path))
    with pytest.raises(Refused, match="already enabled"):
        enable(store, _request(tmp_path, vmid=first.vmid))
    with pytest.raises(Refused, match="already a disk of replication/web01"):
        enable(store, _request(tmp_path, name="other"))
    assert [s.vmid for s in store.all()] == [first.vmid]


def test_find_vm_by_vmid_or_unique_name(store: PrimaryStateStore, tmp_path: Path) -> None:
    a = enable(store, _request(tmp_path, disk_specs=[f"d0={_image(tmp_path, 'a.raw')}"]))
    assert find_vm(store, a.vmid).vmid == a.vmid
    assert find_vm(store, "web01").vmid == a.vmid
    enable(store, _request(tmp_path, disk_specs=[f"d0={_image(tmp_path, 'b.raw')}"]))
    with pytest.raises(NotEnabled, match="2 VMs are named 'web01'"):
        find_vm(store, "web01")
    with pytest.raises(NotEnabled, match="no VM 'db' is enabled"):
        find_vm(store, "db")
    with pytest.raises(NotEnabled, match="is not enabled for replication here"):
        find_vm(store, str(uuid.uuid4()))


def test_resume_clears_a_halt_and_says_why_it_was(store: PrimaryStateStore, tmp_path: Path) -> None:
    state = enable(store, _request(tmp_path))
    store.update(state.vmid, lambda st: setattr(st, "halted", "disk d0 grew"))
    paused, halted = set_paused(store, state, True)
    assert paused.paused
    assert halted is None
    assert paused.halted == "disk d0 grew"
    resumed, halted = set_paused(store, state, False)
    assert not resumed.paused
    assert halted == "disk d0 grew"
    assert store.load(state.vmid).halted is None


def test_resume_gives_up_a_failover_in_doubt(store: PrimaryStateStore, tmp_path: Path) -> None:
    state = enable(store, _request(tmp_path))
    doubt = {"sequence": 3, "state_digest": "00" * 16, "generation": 1, "reverse_port": 0}

    def in_doubt(st: VMReplicationState) -> None:
        st.failover_in_doubt, st.halted = dict(doubt), "failover in doubt: no answer"

    store.update(state.vmid, in_doubt)
    set_paused(store, state, True)  # a pause decides nothing
    assert store.load(state.vmid).failover_in_doubt == doubt
    resumed, halted = set_paused(store, state, False)
    assert halted == "failover in doubt: no answer"
    assert resumed.failover_in_doubt is None
    assert store.load(state.vmid).failover_in_doubt is None
    assert store.load(state.vmid).halted is None


def test_set_limits(store: PrimaryStateStore, tmp_path: Path) -> None:
    state = enable(store, _request(tmp_path, bandwidth_bps=5e6))
    with pytest.raises(Refused, match="give --frequency"):
        set_limits(store, state)
    changed = set_limits(store, state, frequency_s=60.0)
    assert (changed.frequency_s, changed.bandwidth_bps) == (60.0, 5e6)
    changed = set_limits(store, state, no_bandwidth_limit=True)
    assert (store.load(state.vmid).frequency_s, changed.bandwidth_bps) == (60.0, None)


def test_disable_waits_for_a_running_cycle_and_refuses_while_it_runs(
    store: PrimaryStateStore, tmp_path: Path
) -> None:
    state = enable(store, _request(tmp_path))
    running = cycle_lock(store.root, state.vmid)
    assert running.try_acquire()
    waited: list[bool] = []
    try:
        assert not wait_for_cycle(store, state, 0.05, lambda: waited.append(True))
        with pytest.raises(CycleStillRuns, match="paused now, not disabled"):
            disable(store, state, 0.05)
    finally:
        running.release()
    assert waited == [True]
    # Left paused so that no new cycle starts, and still there.
    assert store.load(state.vmid).paused
    disable(store, state, 1.0)
    assert not store.exists(state.vmid)


def test_set_compression_is_checked_and_spelled_one_way(
    store: PrimaryStateStore, tmp_path: Path
) -> None:
    state = enable(store, _request(tmp_path))
    assert set_limits(store, state, compression="LZ4, zstd").compression == "zstd,lz4"
    assert set_limits(store, state, compression="none").compression == "none"
    assert set_limits(store, state, compression="default").compression is None
    with pytest.raises(Refused, match="'gzip' is not zstd, lz4 or none"):
        set_limits(store, state, compression="gzip")
    assert store.load(state.vmid).compression is None

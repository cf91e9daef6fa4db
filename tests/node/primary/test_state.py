"""PrimaryStateStore: atomic save, load, all, delete."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from node.primary.state import (
    STATE_FILE,
    IRStage,
    PrimaryStateStore,
    StateCorrupt,
    VMReplicationState,
    write_file_atomic,
)


def _state(name: str = "vm1", **changes: object) -> VMReplicationState:
    state = VMReplicationState(
        vmid=str(uuid.uuid4()),
        name=name,
        disks=[{"disk_id": "d0", "path": "/images/vm1-d0.raw", "size": 1 << 30}],
        recovery_host="r1.example.com",
        recovery_port=7443,
        server_name="r1.example.com",
        frequency_s=30.0,
    )
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path / "state")
    state = _state(
        ir_state=IRStage.IN_PROGRESS,
        ir_cursor=[0, 65536],
        sequence=7,
        last_replicated_at=1.5,
        pending_bytes=100,
        broker="brkr.example.com:7443",
    )
    store.save(state)
    assert store.load(state.vmid) == state
    assert store.load(state.vmid.upper()) == state  # any spelling of the GUID
    assert store.exists(state.vmid)
    state.paused = True
    store.save(state)
    assert store.load(state.vmid).paused
    directory = store.vm_dir(state.vmid)
    assert os.listdir(directory) == [STATE_FILE]  # no temp file left behind


def test_all_and_delete(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path)
    a, b = _state("a"), _state("b")
    store.save(a)
    store.save(b)
    (tmp_path / "not-a-vm").mkdir()
    assert sorted(s.name for s in store.all()) == ["a", "b"]
    (store.vm_dir(a.vmid) / "digests-0.map").write_bytes(b"x")
    store.delete(a.vmid)
    assert [s.name for s in store.all()] == ["b"]
    assert not store.vm_dir(a.vmid).exists()
    with pytest.raises(FileNotFoundError):
        store.load(a.vmid)
    store.delete(a.vmid)  # again: not an error


def test_corrupt_state(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path)
    good, bad = _state("good"), _state("bad")
    store.save(good)
    store.save(bad)
    path = store.vm_dir(bad.vmid) / STATE_FILE
    path.write_text("{not json")
    with pytest.raises(StateCorrupt):
        store.load(bad.vmid)
    assert [s.name for s in store.all()] == ["good"]  # skipped, logged
    doc = good.to_json()
    for key, value in [("sequence", "7"), ("ir_state", "DONE"), ("paused", 1), ("format", 9)]:
        with pytest.raises(StateCorrupt):
            VMReplicationState.from_json({**doc, key: value})
    other = dict(doc, vmid=str(uuid.uuid4()))
    path.write_text(json.dumps(other))
    with pytest.raises(StateCorrupt):
        store.load(bad.vmid)  # the file holds another VM


def test_old_file_takes_defaults(tmp_path: Path) -> None:
    doc = _state().to_json()
    # a file of format 1 (before the checksum), written before these fields existed
    doc["format"] = 1
    for key in ("health", "broker", "pending_bytes", "checksum"):
        del doc[key]
    state = VMReplicationState.from_json({**doc, "future_field": 1})
    assert (state.health, state.broker, state.pending_bytes) == ("initial replication", None, 0)


def test_a_flipped_bit_is_refused(tmp_path: Path) -> None:
    """Every single-bit flip of a saved state is refused (StateCorrupt), never read as
    another valid state; the sequence's digits are where a flip would do most harm."""
    store = PrimaryStateStore(tmp_path)
    # a float of 17 significant digits: a flip of its last digit may parse to the same
    # number, which only a comparison of the bytes catches
    good = _state(sequence=23, last_replicated_at=1796524969.8730306)
    store.save(good)
    path = store.vm_dir(good.vmid) / STATE_FILE
    raw = path.read_bytes()
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(StateCorrupt):
            store.load(good.vmid)
    path.write_bytes(raw)
    assert store.load(good.vmid).sequence == 23


def test_bad_vmid_and_values_refused(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path)
    with pytest.raises(ValueError, match="not a VMID"):
        store.load("../../etc")
    with pytest.raises(ValueError, match="not a VMID"):
        store.save(_state(vmid="../x"))
    with pytest.raises(ValueError, match="block_size"):
        store.save(_state(block_size=1000))
    assert os.listdir(tmp_path) == []


def test_write_file_atomic_keeps_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert write_file_atomic(path, [b"ab", bytearray(b"cd"), memoryview(b"ef")]) == 6
    assert path.read_bytes() == b"abcdef"

    class Boom:
        def __buffer__(self, flags: int) -> memoryview:
            raise RuntimeError("boom")

    with pytest.raises((RuntimeError, TypeError)):
        write_file_atomic(path, [b"new", Boom()])  # type: ignore[list-item]
    assert path.read_bytes() == b"abcdef"
    assert os.listdir(tmp_path) == ["f"]


def test_failover_in_doubt_round_trips_and_is_checked(tmp_path: Path) -> None:
    store = PrimaryStateStore(tmp_path / "state")
    doubt = {"sequence": 4, "state_digest": "0f" * 16, "generation": 2, "reverse_port": 7444}
    state = _state(failover_in_doubt=doubt)
    store.save(state)
    assert store.load(state.vmid).failover_in_doubt == doubt
    assert _state().failover_in_doubt is None
    for bad in (
        {"sequence": 4, "generation": 2, "reverse_port": 0},  # no digest
        {**doubt, "state_digest": "0f"},
        {**doubt, "state_digest": "zz" * 16},
        {**doubt, "sequence": -1},
        {**doubt, "generation": True},
    ):
        with pytest.raises(ValueError, match="failover_in_doubt"):
            _state(failover_in_doubt=bad).validate()

"""Finding and removing the copies of a VMID held in two storage locations (REP-34):
every copy is shown, one is removed, the last never is."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import frproto as fp
from node.storage import ReplicaStore
from node.storage.duplicates import find_duplicates, remove_duplicate

DISKS = (fp.DiskInfo("disk0", 65536),)


def _create(root: Path, vmid: uuid.UUID, name: str, group: str) -> None:
    with ReplicaStore(root) as store:
        store.create(vmid, name=name, config=b"", disks=DISKS, primary="p", trust_group=group)


def test_every_copy_is_shown_one_is_removed_and_never_the_last(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    twice, once = uuid.uuid4(), uuid.uuid4()
    _create(a, twice, "web01", "ga")
    _create(b, twice, "evil", "gb")
    _create(a, once, "db01", "ga")
    places = [a, b, c]  # c does not exist: it holds nothing
    found = find_duplicates(places)
    assert list(found) == [twice]
    shown = {(x.storage, x.name, x.trust_group, x.applied_sequence) for x in found[twice]}
    assert shown == {(a, "web01", "ga", 0), (b, "evil", "gb", 0)}
    with pytest.raises(fp.UnknownVM, match="not a storage location"):
        remove_duplicate(places, twice, tmp_path / "elsewhere")
    with pytest.raises(fp.AlreadyExists, match="only copy"):
        remove_duplicate(places, once, a)
    with pytest.raises(fp.UnknownVM, match="no replica"):
        remove_duplicate(places, once, b)
    removed = remove_duplicate(places, twice, tmp_path / "x" / ".." / "b")  # any spelling
    assert (removed.storage, removed.name) == (b, "evil")
    assert find_duplicates(places) == {}
    with ReplicaStore(b) as store:
        assert not store.exists(twice)
        assert not store.is_deleted(twice)  # no tombstone: the VM lives on in a
    with pytest.raises(fp.AlreadyExists, match="only copy"):
        remove_duplicate(places, twice, a)
    with ReplicaStore(a) as store:
        assert store.exists(twice)

"""A damaged replica is shown by `frctl replica list` (not hidden, and not hiding the
others) and set aside by `frctl replica quarantine`, after which its VM is unknown and a
new replica can be created (the primary's next cycle does it, with an IR)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

import frproto as fp
from frctl.main import main
from node.storage import ReplicaStore
from tests.node.site import Site

DISKS = (fp.DiskInfo("disk0", 65536),)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_damaged_replica_is_listed_and_quarantined(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = Site(tmp_path)
    config = str(site.server_config)
    good, bad = uuid.uuid4(), uuid.uuid4()
    with ReplicaStore(site.storage) as store:
        for vmid, name in ((good, "web01"), (bad, "db01")):
            store.create(vmid, name=name, config=b"", disks=DISKS, primary="p", trust_group="t")
    state = site.storage / str(bad) / "state.json"
    raw = bytearray(state.read_bytes())
    raw[raw.index(b'"applied_sequence": 0') + 20] ^= 0x01  # 0 -> 1: one bit
    state.write_bytes(bytes(raw))

    code, out, err = _run(capsys, "replica", "list", "--config", config, "--json")
    assert code == 3
    rows = {r["vmid"]: r for r in json.loads(out)}
    assert rows[str(good)]["ir"] == "NOT_STARTED"  # the healthy one is still shown
    assert rows[str(bad)]["ir"] == "DAMAGED"
    assert "damaged" in rows[str(bad)]["damaged"]
    assert f"replica quarantine {bad}" in err

    # a healthy replica is never moved; without --yes nothing is
    code, _out, err = _run(
        capsys, "replica", "quarantine", "--config", config, str(good),
        "--storage", str(site.storage), "--yes",
    )  # fmt: skip
    assert code != 0
    assert "not damaged" in err
    code, _out, err = _run(
        capsys,
        "replica",
        "quarantine",
        "--config",
        config,
        str(bad),
        "--storage",
        str(site.storage),
    )
    assert code == 1
    assert "--yes" in err
    assert state.exists()

    code, out, _err = _run(
        capsys, "replica", "quarantine", "--config", config, str(bad),
        "--storage", str(site.storage), "--yes", "--json",
    )  # fmt: skip
    assert code == 0
    moved = Path(json.loads(out)["to"])
    assert moved.parent == site.storage.resolve() / ".quarantine"
    assert (moved / "state.json").read_bytes() == bytes(raw)  # kept as it was, for inspection

    code, out, _err = _run(capsys, "replica", "list", "--config", config, "--json")
    assert code == 0
    assert [r["vmid"] for r in json.loads(out)] == [str(good)]
    with ReplicaStore(site.storage) as store:
        assert not store.exists(bad)
        assert not store.is_deleted(bad)  # no tombstone: the primary may start anew
        store.create(bad, name="db01", config=b"", disks=DISKS, primary="p", trust_group="t")
        assert store.vmids() == sorted([good, bad])

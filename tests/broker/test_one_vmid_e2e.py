"""One VMID, one replica in a cluster (docs/protocol.md BRK-4, REP-9, REP-33, REP-34):
real node processes whose settings admit two primaries of two trust groups, each with a
storage location of its own. The second group is refused at the broker and at the VM's
node, also before the first group's replica exists, and nothing is written in its
storage; a node that finds a VMID in two locations at start-up refuses it until an
operator removes one copy with ``frctl replica``."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.cluster import OTHER_GROUP_NAME
from node.primary.client import RecoveryClient
from tests.broker.cluster_site import (
    CAP_ADDRESS,
    CAP_NAME,
    PRIMARY_ADDRESS,
    PRIMARY_NAME,
    ClusterSite,
    node_address,
    node_name,
    primary_replicator,
)
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner

DISKS = (fp.DiskInfo("disk0", 2 * 1024 * 1024),)


async def _connect(site: ClusterSite, i: int | None, name: str) -> RecoveryClient:
    """A connection as the primary ``name`` to node ``i``, or to the CAP (None)."""
    host, port, server = (
        (CAP_ADDRESS, site.cap_port, CAP_NAME)
        if i is None
        else (node_address(i), site.running[i].port, node_name(i))
    )
    return await RecoveryClient.connect(
        host,
        port,
        server_name=server,
        ssl_context=site.primary_context(name),
        local_address=PRIMARY_ADDRESS,
        timeout=10,
    )


async def _answer(
    site: ClusterSite, i: int | None, name: str, vmid: uuid.UUID, *, create: bool = True
) -> fp.RelationshipAccepted | fp.QueryRecoveryServerResponse | fp.FrprotoError:
    """What node ``i`` (or the broker, None) answers ``name``'s create/open (query)."""
    client = await _connect(site, i, name)
    try:
        if i is None:
            return await client.query(vmid, name="evil", disk_sizes=(DISKS[0].size,))
        return await client.open(vmid, name="evil", disks=DISKS, create=create)
    except fp.FrprotoError as exc:
        return exc
    finally:
        await client.aclose()


def _held(storage: Path) -> list[str]:
    if not storage.is_dir():
        return []
    return sorted(p.name for p in storage.iterdir() if not p.name.startswith("."))


def frctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    site = ClusterSite(tmp_path, nodes=2)
    try:
        site.start_all()
        site.authorize_primary(other_group=True)
        yield site
    finally:
        site.stop_all()


def test_another_trust_group_is_refused_at_the_broker_and_at_the_node(
    site: ClusterSite,
) -> None:
    vmid = uuid.uuid4()
    image = make_image(site.root / "disk0.img", random.Random(3))
    trio.run(cycle_until_done, primary_replicator(site, vmid, [image]))
    where = index(owner(site, vmid).owner)
    elsewhere = 3 - where

    async def main() -> None:
        # At the broker (BRK-4), at the VM's node (REP-33, REP-9), at the other node.
        at_cap = await _answer(site, None, OTHER_GROUP_NAME, vmid)
        assert isinstance(at_cap, fp.NotAuthorized), at_cap
        for create in (True, False):
            at_node = await _answer(site, where, OTHER_GROUP_NAME, vmid, create=create)
            assert isinstance(at_node, fp.NotAuthorized), at_node
            assert "'tg'" in str(at_node)
        assert isinstance(await _answer(site, elsewhere, OTHER_GROUP_NAME, vmid), fp.VMNotHere)
        # Placed but not created yet: the record binds it to its group all the same.
        fresh = uuid.uuid4()
        client = await _connect(site, None, PRIMARY_NAME)
        try:
            placed = await client.query(fresh, name="fresh", disk_sizes=(DISKS[0].size,))
        finally:
            await client.aclose()
        assert placed.existing is fp.ExistingVM.NEW
        node = index(placed.server_name)
        early = await _answer(site, node, OTHER_GROUP_NAME, fresh)
        assert isinstance(early, fp.NotAuthorized), early
        mine = await _connect(site, node, PRIMARY_NAME)
        try:
            accepted = await mine.open(fresh, name="fresh", disks=DISKS)
            assert accepted.ir_state is fp.IRState.NOT_STARTED
        finally:
            await mine.aclose()

    trio.run(main)
    for i in (1, 2):
        assert _held(site.storage(i) / "replicas-other") == []
    assert str(vmid) in _held(site.storage(where) / "replicas")


def test_a_node_refuses_a_vmid_held_twice_until_an_operator_removes_a_copy(
    site: ClusterSite,
) -> None:
    vmid = uuid.uuid4()
    image = make_image(site.root / "disk0.img", random.Random(5))
    trio.run(cycle_until_done, primary_replicator(site, vmid, [image]))
    where = index(owner(site, vmid).owner)
    root = site.storage(where)
    mine, copy = root / "replicas", root / "replicas-other"
    # A second copy made by hand while the node is down (a restored backup).
    site.running.pop(where).kill()
    shutil.copytree(mine / str(vmid), copy / str(vmid))
    node = site.start(where)
    assert node.proc.poll() is None
    config = str(site.config_path(where))

    async def opened() -> (
        fp.RelationshipAccepted | fp.QueryRecoveryServerResponse | fp.FrprotoError
    ):
        return await _answer(site, where, PRIMARY_NAME, vmid, create=False)

    refused = trio.run(opened)
    assert isinstance(refused, fp.Busy), refused
    assert f"VM {vmid} has a replica in 2 storage locations" in node.text()
    shown = frctl("replica", "duplicates", "--config", config, "--json")
    assert shown.returncode == 3, shown.stderr
    copies = {(c["storage"], c["trust_group"]) for c in json.loads(shown.stdout)}
    assert copies == {(str(mine), "tg"), (str(copy), "tg")}
    removed = frctl(
        "replica",
        "remove-duplicate",
        "--config",
        config,
        str(vmid),
        "--storage",
        str(copy),
        "--yes",
    )
    assert removed.returncode == 0, removed.stderr
    assert _held(copy) == []
    again = trio.run(opened)
    assert isinstance(again, fp.RelationshipAccepted), again
    assert again.ir_state is fp.IRState.COMPLETE

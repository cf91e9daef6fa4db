"""Planned failover (protocol 1.1) of a cluster VM, from its primary: the owning node
checks the final state and takes the VM over while another VM on the same node keeps
replicating, and records it in the VM's record (``frctl cluster vms``)."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from frctl.main import main as frctl
from frtesting.cluster import (
    PRIMARY_ADDRESS,
    PRIMARY_NAME,
    ClusterSite,
    primary_replicator,
    replica_path,
)
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner, scribble


def test_planned_failover_at_a_node_that_keeps_serving_its_other_vms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = ClusterSite(tmp_path, nodes=1)
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(52)
        vmid, other = uuid.uuid4(), uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        other_image = make_image(site.root / "other.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        second: Any = primary_replicator(site, other, [other_image])
        trio.run(cycle_until_done, vm)
        trio.run(cycle_until_done, second)
        scribble(image, rng)  # the VM's last writes before it stops
        cycles = 0

        async def both() -> Any:
            nonlocal cycles
            async with trio.open_nursery() as nursery:

                async def keep_replicating() -> None:
                    nonlocal cycles
                    while True:
                        scribble(other_image, rng)
                        await cycle_until_done(second)
                        cycles += 1

                nursery.start_soon(keep_replicating)
                # Port 7443 of the primary's address: where its own recovery server
                # would listen (none does here: the reverse direction is only recorded).
                done = await vm.hand_over(reverse_port=7443)
                while cycles < 2:  # the other VM's cycles go on after the takeover too
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            return done

        done = trio.run(both)
        node = owner(site, vmid).owner
        assert done.generation == 2
        assert replica_path(site, index(node), vmid).read_bytes() == image.read_bytes()
        trio.run(cycle_until_done, second)
        assert replica_path(site, index(node), other).read_bytes() == other_image.read_bytes()
        # The VM's record says so, with the point and the generation.
        record = owner(site, vmid)
        assert record.failover == "done"
        assert record.failover_generation == 2
        assert record.failover_point == done.sequence
        assert "planned" in record.failover_note
        assert record.reverse_to == f"{PRIMARY_ADDRESS}:7443"
        assert record.reverse_name == PRIMARY_NAME
        where = ["--store", site.store_url, "--prefix", site.prefix]
        assert frctl(["cluster", "vms", *where, "--json"]) == 0
        rows = {r["vmid"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows[str(vmid)]["failover"] == "done"
        assert rows[str(other)]["failover"] == ""
        assert rows[str(vmid)]["reverse_to"] == f"{PRIMARY_ADDRESS}:7443"
        assert rows[str(other)]["reverse_to"] == ""
        assert frctl(["cluster", "vms", *where]) == 0
        lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
        assert "failover done (generation 2)" in lines[str(vmid)]
        assert f"reverse -> {PRIMARY_ADDRESS}:7443" in lines[str(vmid)]
        assert "failover" not in lines[str(other)]
        assert "reverse" not in lines[str(other)]
    finally:
        site.stop_all()

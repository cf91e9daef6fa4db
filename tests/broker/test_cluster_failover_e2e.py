"""Unplanned failover in a cluster: asked through the store (``frctl cluster failover``),
carried out by the replica's node while it runs; real node processes, a real primary."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from frctl.main import main as frctl
from node.primary.replicator import ReplicationHalted
from tests.broker.cluster_site import ClusterSite, primary_replicator, replica_path
from tests.broker.test_migration_e2e import (
    cycle_until_done,
    index,
    make_image,
    owner,
    scribble,
)


def test_a_failover_through_the_cluster_brings_the_chosen_point_and_fences_the_primary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = tmp_path / "started.txt"
    site = ClusterSite(
        tmp_path,
        nodes=2,
        failover_start=f'echo "$FRREP_VMID $FRREP_SEQUENCE $FRREP_DISKS" > {started}',
    )
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(51)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        replicator: Any = primary_replicator(site, vmid, [image])
        copies: dict[int, bytes] = {}
        trio.run(cycle_until_done, replicator)  # IR: point 0
        copies[replicator.state.sequence] = image.read_bytes()
        for _ in range(3):
            scribble(image, rng)
            trio.run(cycle_until_done, replicator)
            copies[replicator.state.sequence] = image.read_bytes()
        assert sorted(copies) == [0, 1, 2, 3]
        node = owner(site, vmid).owner
        where = ["--store", site.store_url, "--prefix", site.prefix]
        config = str(site.config_path(index(node)))
        # A test failover at the node, with its own configuration, while it serves.
        out_dir = tmp_path / "test-vm"
        test = ["failover", "test", "--config", config, str(vmid), "--out", str(out_dir)]
        assert frctl([*test, "--point", "2"]) == 0
        assert (out_dir / "disks" / "disk0.img").read_bytes() == copies[2]
        assert frctl(["failover", "cleanup", str(out_dir)]) == 0
        # The stand-alone unplanned failover is refused with a node's configuration:
        # the node's agent holds the replicas.
        assert frctl(["failover", "unplanned", "--config", config, str(vmid)]) == 1
        assert "frctl cluster failover" in capsys.readouterr().err

        # A point that is not kept is refused at the node, and nothing changes.
        bad = ["cluster", "failover", *where, str(vmid), "--point", "99", "--wait", "20"]
        assert frctl(bad) == 1
        refused = owner(site, vmid)
        assert refused.failover == "failed"
        assert "no recovery point 99" in refused.failover_note
        assert replica_path(site, index(node), vmid).read_bytes() == copies[3]

        # Point 1, while the node serves: the replica is brought back to that cycle.
        args = ["cluster", "failover", *where, str(vmid), "--point", "1", "--json"]
        assert frctl([*args, "--wait", "20"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["failover"], out["node"], out["sequence"]) == ("done", node, 1)
        assert out["generation"] >= 1
        replica = replica_path(site, index(node), vmid)
        assert replica.read_bytes() == copies[1]
        # The node's start hook ran with the replica's own disks.
        assert started.read_text().split() == [str(vmid), "1", str(replica)]

        # The former primary is refused from now on, and the replica is untouched.
        scribble(image, rng)
        with pytest.raises((fp.NotAuthorized, ReplicationHalted)):
            trio.run(replicator.cycle)
        assert replica.read_bytes() == copies[1]
        # A failed-over VM is not moved, and not failed over twice.
        other = next(n for n in ("n1.example.com", "n2.example.com") if n != node)
        assert frctl(["cluster", "migrate", *where, str(vmid), other]) == 1
        assert frctl([*args, "--wait", "5"]) == 1
        assert "already done" in capsys.readouterr().err
        log = site.running[index(node)].text()
        assert f"failed over at {node}: recovery point 1, generation" in log
    finally:
        site.stop_all()

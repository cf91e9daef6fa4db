"""Completing and cancelling a failover in a cluster: asked through the store (``frctl
cluster failover-cancel`` / ``failover-complete``), carried out by the replica's node
while it runs; real node processes, a real primary."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from frctl.main import main as frctl
from tests.broker.cluster_site import ClusterSite, primary_replicator, replica_path
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner, scribble


def test_cancel_through_the_cluster_then_replication_carries_on_then_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped = tmp_path / "stopped.txt"
    site = ClusterSite(
        tmp_path, nodes=2, failover_stop=f'echo "$FRREP_VMID $FRREP_SEQUENCE" >> {stopped}'
    )
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(52)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        replicator: Any = primary_replicator(site, vmid, [image])
        trio.run(cycle_until_done, replicator)
        for _ in range(2):
            scribble(image, rng)
            trio.run(cycle_until_done, replicator)
        latest = replicator.state.sequence
        node = owner(site, vmid).owner
        where = ["--store", site.store_url, "--prefix", site.prefix]
        replica = replica_path(site, index(node), vmid)
        assert replica.read_bytes() == image.read_bytes()

        # Failed over to point 1, then cancelled: back at the latest, the same generation.
        fail = ["cluster", "failover", *where, str(vmid), "--point", "1", "--json"]
        assert frctl([*fail, "--wait", "20"]) == 0
        generation = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generation"]
        cancel = ["cluster", "failover-cancel", *where, str(vmid), "--json", "--wait", "20"]
        assert frctl(cancel) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["failover"], out["node"], out["sequence"]) == ("", node, latest)
        assert out["generation"] == generation - 1
        assert stopped.read_text().split() == [str(vmid), "1"]  # the node's stop hook
        assert replica.read_bytes() == image.read_bytes()
        assert owner(site, vmid).failover == ""
        # The primary carries on: the broker answers it again, the node takes its batch.
        scribble(image, rng)
        trio.run(cycle_until_done, replicator)
        assert replicator.state.sequence == latest + 1
        assert replica.read_bytes() == image.read_bytes()

        # Failed over again, then completed: a cancel is refused from then on.
        assert frctl([*fail[:-3], "--wait", "20"]) == 0
        complete = ["cluster", "failover-complete", *where, str(vmid), "--json", "--wait", "20"]
        assert frctl(complete) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["failover"], out["sequence"]) == ("completed", latest + 1)
        assert frctl(cancel) != 0
        assert "cannot be cancelled" in capsys.readouterr().err
        log = site.running[index(node)].text()
        assert "failover cancelled at" in log
        assert "failover completed at" in log
    finally:
        site.stop_all()

"""Reverse replication and failback in a cluster, through the broker's records: after
``frctl cluster failover``, ``frctl cluster reverse VMID --to HOST`` has the owning node
replicate the VM back to the former primary's recovery server (differences first); the
record shows the new direction; failback is a planned failover back, and the VM ends at
the former primary with nothing lost."""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from frctl.main import main as frctl
from frlink.authz import Authorization, AuthorizationEntry
from frtesting.cluster import (
    PRIMARY_ADDRESS,
    PRIMARY_NAME,
    ClusterSite,
    node_address,
    node_name,
    primary_replicator,
)
from frtesting.server import start_server_process
from node.failover.reverse import adopt_disks
from node.storage.layout import ReplicaLayout
from tests.broker.test_migration_e2e import cycle_until_done, make_image, owner, scribble


def test_reverse_through_the_cluster_then_failback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = ClusterSite(tmp_path, nodes=1)
    a_server = None
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(53)
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        trio.run(cycle_until_done, vm)
        scribble(image, rng)
        trio.run(cycle_until_done, vm)
        where = ["--store", site.store_url, "--prefix", site.prefix]
        # Site A is lost: unplanned failover at the cluster.
        assert frctl(["cluster", "failover", *where, str(vmid), "--wait", "20", "--json"]) == 0
        generation = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generation"]
        record = owner(site, vmid)
        node = record.owner
        running = ReplicaLayout(site.storage(1) / record.storage, vmid).image("disk0")
        scribble(running, rng)  # the VM runs at the node and writes
        # A comes back: its disks become the replica its recovery server keeps.
        a_storage = tmp_path / "a-replicas"
        adopt_disks(
            Authorization(entries=(AuthorizationEntry(node, a_storage, "reverse"),)),
            vmid,
            name="vm",
            disks=[("disk0", image)],
            primary=node,
            generation=generation,
        )
        config = tmp_path / "a-server.toml"
        config.write_text(
            f'[server]\nname = "{PRIMARY_NAME}"\nlisten = "{PRIMARY_ADDRESS}"\nport = 0\n\n'
            f'[tls]\ncert = "{site.certs}/{PRIMARY_NAME}.pem"\n'
            f'key = "{site.certs}/{PRIMARY_NAME}-key.pem"\nca = "{site.certs}/ca.pem"\n\n'
            f'[[authorization]]\nprimary = "{node}"\nstorage = "{a_storage}"\n'
            'trust_group = "reverse"\n'
        )
        a_server = start_server_process(config, tmp_path)
        to = f"{PRIMARY_ADDRESS}:{a_server.port}"
        # Not before a failover: refused.
        assert frctl(["cluster", "reverse", *where, str(uuid.uuid4()), "--to", to]) != 0
        capsys.readouterr()
        args = ["cluster", "reverse", *where, str(vmid), "--to", to, "--to-name", PRIMARY_NAME]
        assert frctl(args) == 0
        record = owner(site, vmid)
        assert record.reverse_to == to
        assert record.reverse_name == PRIMARY_NAME
        capsys.readouterr()
        assert frctl(["cluster", "vms", *where]) == 0
        assert f"reverse -> {to}" in capsys.readouterr().out
        # The node replicates it back by itself: A's replica comes to equal the running disk.
        a_disk = ReplicaLayout(a_storage, vmid).image("disk0")
        deadline = time.monotonic() + 30
        while a_disk.read_bytes() != running.read_bytes():
            assert time.monotonic() < deadline, "the reverse replication did not arrive"
            time.sleep(0.2)
        # Failback: a planned failover at the node, on its reverse replication's state.
        state_dir = next(site.root.rglob("reverse-primary"))
        node_primary = tmp_path / "node-reverse.toml"
        node_primary.write_text(
            f'[primary]\nname = "{node}"\nstate_dir = "{state_dir}"\n'
            f'local_address = "{node_address(1)}"\n\n'
            f'[tls]\ncert = "{site.certs}/{node_name(1)}.pem"\n'
            f'key = "{site.certs}/{node_name(1)}-key.pem"\nca = "{site.certs}/ca.pem"\n'
        )
        scribble(running, rng)
        final = running.read_bytes()
        back = ["failover", "planned", "--config", str(node_primary), str(vmid), "--json"]
        assert frctl([*back, "--stop-command", "true"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["generation"] == generation + 1
        assert a_disk.read_bytes() == final  # the VM ends at A, nothing lost
    finally:
        if a_server is not None:
            a_server.stop()
        site.stop_all()

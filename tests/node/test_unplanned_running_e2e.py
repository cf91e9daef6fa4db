"""Unplanned failover on a running stand-alone recovery server: the server does it
itself, asked on its control socket, and goes on serving its other VMs."""

from __future__ import annotations

import json
import random
import uuid

import pytest
import trio

import frproto as fp

from .site import Site
from .test_cli_replication import frctl
from .test_reverse_e2e import change_blocks

MIB = 1024 * 1024


def test_unplanned_failover_while_the_server_runs(site: Site) -> None:
    rng = random.Random(2003)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    other = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(2 * MIB))
    other_image = site.root / "other.img"
    other_image.write_bytes(rng.randbytes(MIB))
    server = site.start_server()
    try:
        vm = site.replicator(vmid, "web01", [image], server.port)
        trio.run(vm.cycle)  # IR: point 0
        change_blocks(image, rng, [1])
        trio.run(vm.cycle)  # point 1
        at_point_1 = image.read_bytes()
        change_blocks(image, rng, [2, 9])
        trio.run(vm.cycle)  # point 2
        # The primary site is lost; at the recovery site, with the server running:
        started = site.root / "started"
        done = frctl(
            "failover", "unplanned", "--config", str(site.server_config), str(vmid),
            "--point", "1", "--start-command", f'echo "$FRREP_SEQUENCE $FRREP_DISKS" > {started}',
            "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["generation"] == 2
        assert result["sequence"] == 1
        assert result["server_running"] is True
        # The VM runs from the replica brought back to point 1, in place.
        replica = site.replica_image(vmid, 0, applied=False)
        assert replica.read_bytes() == at_point_1
        assert started.read_text().split() == ["1", str(replica)]
        # The former primary is refused by the running server from now on.
        with pytest.raises(fp.NotAuthorized):
            trio.run(site.restarted(vm).cycle)
        # The server goes on serving its other VMs.
        second = site.replicator(other, "db01", [other_image], server.port)
        trio.run(second.cycle)
        assert site.replica_image(other, 0).read_bytes() == other_image.read_bytes()
    finally:
        server.stop()

"""Kill -9 the node running the broker: another node takes the election and the CAP
within 3 s, and primaries carry on. Against SQLite and against a 3-member etcd cluster,
where one etcd member is killed too."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from tests.broker.cluster_site import ClusterSite, primary_replicator, replica_path
from tests.broker.conftest import etcd_binary
from tests.broker.etcd_cluster import EtcdCluster, etcd_cluster
from tests.broker.test_migration_e2e import (
    cycle_until_done,
    index,
    make_image,
    owner,
    scribble,
)


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest) -> Iterator[EtcdCluster | None]:
    if request.param == "sqlite":
        yield None
        return
    with etcd_cluster(3, binary=etcd_binary()) as cluster:
        yield cluster


def test_the_broker_moves_within_3_s_and_primaries_carry_on(
    tmp_path: Path, backend: EtcdCluster | None
) -> None:
    url = backend.url if backend is not None else ""
    # Shared storage: whichever node dies, its replicas are re-homed, not stranded.
    site = ClusterSite(tmp_path, nodes=4, store_url=url, shared_storage=True)
    try:
        site.start_all()
        site.authorize_primary()
        rng = random.Random(10)
        vms: list[tuple[Any, Path]] = []
        for n in range(3):
            image = make_image(site.root / f"disk{n}.img", rng)
            replicator = primary_replicator(site, uuid.uuid4(), [image])
            trio.run(cycle_until_done, replicator)
            vms.append((replicator, image))
        broker = site.broker_node()
        broker.kill()
        killed = time.monotonic()
        survivor = site.broker_node(timeout=10)
        took = time.monotonic() - killed
        store = "etcd (3 members)" if backend is not None else "SQLite"
        print(
            f"[{store}] broker {broker.name} killed: {survivor.name} serves the CAP "
            f"after {took:.2f} s"
        )
        assert took < 3.0
        if backend is not None:
            backend.kill(0)  # and one etcd member: the other two keep a quorum
            print(f"[{store}] etcd member m0 killed too")
        # The primaries carry on: every VM replicates its new writes, wherever it lives.
        for replicator, image in vms:
            scribble(image, rng)
            trio.run(cycle_until_done, replicator)
            vmid = uuid.UUID(replicator.state.vmid)
            where = owner(site, vmid).owner
            assert where != broker.name
            assert replica_path(site, index(where), vmid).read_bytes() == image.read_bytes()
        # And the new broker places new VMs.
        answer = trio.run(site.query, uuid.uuid4())
        assert answer.existing is fp.ExistingVM.NEW
        assert answer.server_name != broker.name
    finally:
        site.stop_all()

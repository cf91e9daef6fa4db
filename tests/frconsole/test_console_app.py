"""The web console's rules, in process (the app over a SQLite cluster store, httpx as the
browser): login, the CSRF token on every POST, the settings' validation, the actions and
their audit entries. The real browser against node processes is test_console_browser.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from broker import admin
from broker.cluster_view import read_audit, read_settings
from broker.records import Keys, NodeRecord, VMRecord
from broker.store import ClusterStore, open_store
from frconsole import ConsoleSource, console_app, sessions

PASSWORD = "correct horse battery"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ClusterStore]:
    async with open_store(f"sqlite://{tmp_path / 'cluster.db'}") as s:
        yield s


KEYS = Keys("/t/")
VMID = str(uuid.UUID(int=7))


async def _client(store: ClusterStore) -> httpx.AsyncClient:
    app = console_app(ConsoleSource(store, KEYS, "n1.example.com", "sqlite:///x.db"))
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


async def _seed(store: ClusterStore) -> None:
    await admin.set_console_password(store, KEYS, "admin", PASSWORD)
    for name in ("n1.example.com", "n2.example.com"):
        await store.put(KEYS.node(name), NodeRecord(name, "127.0.0.1", 7443).to_json())
    vm = VMRecord(VMID, "n1.example.com", "replicas", name="web-1", trust_group="tg")
    await store.put(KEYS.vm(VMID), vm.to_json())


async def test_every_page_needs_a_login_and_a_wrong_password_is_refused(
    store: ClusterStore,
) -> None:
    await _seed(store)
    async with await _client(store) as client:
        for path in ("/", "/vms", f"/vms/{VMID}", "/settings", "/audit"):
            page = await client.get(path)
            assert page.status_code == 303, path
            assert page.headers["location"] == "/login"
        wrong = await _login(client, "not the password")
        assert wrong.status_code == 401
        assert "Wrong user name or password" in wrong.text
        assert sessions.SESSION_COOKIE not in client.cookies
        right = await _login(client)
        assert right.status_code == 303
        cookie = right.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "Secure" in cookie
        assert "SameSite=strict" in cookie
        for path in ("/", "/vms", f"/vms/{VMID}", "/settings", "/audit"):
            assert (await client.get(path)).status_code == 200, path


async def test_no_password_set_says_how_to_set_one(store: ClusterStore) -> None:
    async with await _client(store) as client:
        page = await client.get("/login")
        assert "frctl cluster admin-password" in page.text
        assert (await _login(client)).status_code == 401


async def test_a_post_without_the_csrf_token_is_refused(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        # Login itself needs its token.
        assert (
            await client.post("/login", data={"user": "admin", "password": PASSWORD})
        ).status_code == 403
        await _login(client)
        for data in ({"recovery_points": "3"}, {"recovery_points": "3", "csrf": "forged"}):
            refused = await client.post("/settings", data=data)
            assert refused.status_code == 403
        refused = await client.post(f"/vms/{VMID}/delete", data={"confirm": "yes"})
        assert refused.status_code == 403
        assert (await read_settings(store, KEYS)).recovery_points == 24
        assert await read_audit(store, KEYS) == []


async def test_a_setting_changed_and_a_bad_value_refused_with_the_cli_message(
    store: ClusterStore,
) -> None:
    await _seed(store)
    async with await _client(store) as client:
        await _login(client)
        form = await client.get("/settings")
        token = _csrf(form.text)
        bad = await client.post(
            "/settings",
            data={"csrf": token, "recovery_enabled": "on", "recovery_points": "0", "port": "0"},
        )
        assert bad.status_code == 400
        # The words of `frctl cluster settings recovery_points=0`.
        with pytest.raises(admin.InvalidSetting) as cli:
            await admin.update_settings(store, KEYS, {"recovery_points": 0})
        assert str(cli.value) in bad.text
        port = await client.post(
            "/settings", data={"csrf": token, "recovery_enabled": "on", "port": "seventy"}
        )
        assert port.status_code == 400
        assert "port: expected int" in port.text
        good = await client.post(
            "/settings",
            data={
                "csrf": token,
                "recovery_enabled": "on",
                "recovery_points": "7",
                "port": "0",
                "auth_type": "certificate",
                "placement_policy": "round-robin",
                "authorization": "[]",
            },
        )
        assert good.status_code == 200
        assert "recovery_points: 24 -&gt; 7" in good.text
        assert (await read_settings(store, KEYS)).recovery_points == 7
        audit = await read_audit(store, KEYS)
        assert [(e.what, e.changes) for e in audit] == [("settings", {"recovery_points": [24, 7]})]
        assert audit[0].who == "admin (console at n1.example.com)"
        page = await client.get("/audit")
        assert "recovery_points" in page.text


async def test_vm_actions_need_a_confirmation_and_are_audited(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        await _login(client)
        token = _csrf((await client.get(f"/vms/{VMID}")).text)
        unconfirmed = await client.post(
            f"/vms/{VMID}/migrate", data={"csrf": token, "node": "n2.example.com"}
        )
        assert unconfirmed.status_code == 400
        assert "tick the box to confirm" in unconfirmed.text
        moved = await client.post(
            f"/vms/{VMID}/migrate",
            data={"csrf": token, "node": "n2.example.com", "confirm": "yes"},
        )
        assert moved.status_code == 200
        assert "asked to move to n2.example.com" in moved.text
        # broker/admin.py's refusal, shown as it is.
        again = await client.post(f"/vms/{VMID}/failover", data={"csrf": token, "confirm": "yes"})
        assert again.status_code == 400
        assert "is moving to n2.example.com; fail over after" in again.text
        audit = await read_audit(store, KEYS)
        assert [(e.what, e.target, e.changes) for e in audit] == [
            ("migrate", VMID, {"migrate_to": ["", "n2.example.com"]})
        ]


async def test_a_password_change_ends_every_session(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        await _login(client)
        assert (await client.get("/")).status_code == 200
        await admin.set_console_password(store, KEYS, "admin", "another password", by="t")
        assert (await client.get("/")).status_code == 303
        audit = await read_audit(store, KEYS)
        assert audit[0].what == "password"
        assert "scrypt" not in audit[0].to_json().decode()


async def test_the_store_unreachable_is_a_page_not_a_traceback(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        await _login(client)
        await store.aclose()
        page = await client.get("/")
        assert page.status_code == 503
        assert "the cluster store cannot be read" in page.text


async def test_the_cluster_page_says_which_nodes_run_the_settings_and_which_are_down(
    store: ClusterStore,
) -> None:
    await _seed(store)
    # A VM owned by a node that announces nothing: that node is down.
    gone = str(uuid.UUID(int=8))
    await store.put(KEYS.vm(gone), VMRecord(gone, "n3.example.com", "replicas").to_json())
    done = await admin.update_settings(store, KEYS, {"recovery_points": 5})
    await store.put(
        KEYS.node("n2.example.com"),
        NodeRecord("n2.example.com", "127.0.0.1", 7443, settings_revision=done.revision).to_json(),
    )
    async with await _client(store) as client:
        await _login(client)
        page = (await client.get("/")).text
        rows = {
            m.group(1): m.group(0)
            for m in re.finditer(r"<tr>\s*<td>(n\d\.example\.com)</td>.*?</tr>", page, re.S)
        }
        assert set(rows) == {"n1.example.com", "n2.example.com", "n3.example.com"}
        assert "not yet" in rows["n1.example.com"]
        assert f"applied</span> (revision {done.revision})" in rows["n2.example.com"]
        assert 'class="state down"' in rows["n3.example.com"]
        assert 'class="state up"' in rows["n1.example.com"]
        vms = (await client.get("/vms")).text
        assert "n3.example.com <span" in vms  # its owner is marked down


async def test_an_address_that_keeps_guessing_waits(store: ClusterStore) -> None:
    from frconsole.app import LOGIN_FAILURES

    await _seed(store)
    async with await _client(store) as client:
        for _ in range(LOGIN_FAILURES):
            assert (await _login(client, "a guess")).status_code == 401
        # Now even the right password waits: the guesser cannot tell.
        refused = await _login(client)
        assert refused.status_code == 429
        assert "Too many failed logins from 127.0.0.1: try again in" in refused.text
        assert (await client.get("/")).status_code == 303


async def test_logging_in_while_the_store_is_unreachable_says_so(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        page = await client.get("/login")
        await store.aclose()
        answer = await client.post(
            "/login", data={"csrf": _csrf(page.text), "user": "admin", "password": PASSWORD}
        )
        assert answer.status_code == 503
        assert "the cluster store cannot be read" in answer.text


async def test_a_node_drained_and_undrained_from_the_cluster_page(store: ClusterStore) -> None:
    from broker.cluster_view import read_cluster

    await _seed(store)
    async with await _client(store) as client:
        await _login(client)
        page = (await client.get("/")).text
        assert 'action="/nodes/n2.example.com/drain"' in page
        token = _csrf(page)
        assert (await client.post("/nodes/n2.example.com/drain", data={})).status_code == 403
        done = await client.post("/nodes/n2.example.com/drain", data={"csrf": token})
        assert done.status_code == 303
        view = await read_cluster(store, KEYS)
        assert view.nodes["n2.example.com"].state.value == "draining"
        page = (await client.get("/")).text
        assert 'class="state draining"' in page
        assert 'action="/nodes/n2.example.com/undrain"' in page
        await client.post("/nodes/n2.example.com/undrain", data={"csrf": token})
        view = await read_cluster(store, KEYS)
        assert view.nodes["n2.example.com"].state.value == "up"
        audit = await read_audit(store, KEYS)
        assert [(e.what, e.target) for e in audit] == [
            ("undrain", "n2.example.com"),
            ("drain", "n2.example.com"),
        ]


async def test_every_response_carries_the_security_headers(store: ClusterStore) -> None:
    await _seed(store)
    async with await _client(store) as client:
        for path in ("/", "/login", "/static/console.css", "/no-such-page"):
            answer = await client.get(path)
            assert answer.headers["content-security-policy"].startswith("default-src 'self'")
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert (await client.post("/settings")).headers["cache-control"] == "no-store"

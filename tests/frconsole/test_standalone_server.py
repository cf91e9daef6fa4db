"""A stand-alone recovery server's console end to end: ``frctl server admin-password``,
then a real ``frctl server run`` process with ``[console]`` on loopback, a VM replicated
into it by a real primary, and the console read over HTTPS (the server's own certificate,
checked against the test CA) by a client that logs in."""

from __future__ import annotations

import random
import re
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from frtesting.server import ServerProcess, child_env
from tests.node.site import SERVER_HOST, Site

PASSWORD = "stand-alone console password"
MIB = 1024 * 1024
_CONSOLE = re.compile(r"console at https://([0-9.]+):(\d+)/")


def set_password(site: Site, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    """``frctl server admin-password`` with the password on stdin (as a script gives it)."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "frctl.main", "server", "admin-password"),
            *("--config", str(site.server_config)),
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def console_url(server: ServerProcess, timeout: float = 20.0) -> str:
    assert server.wait_for_log("console at https://", timeout), server.log.read_text()
    found = _CONSOLE.search(server.log.read_text())
    assert found, server.log.read_text()
    return f"https://{found.group(1)}:{found.group(2)}"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    made = Site(tmp_path)
    made.server_config.write_text(made.server_config.read_text() + "\n[console]\nport = 0\n")
    return made


@pytest.fixture
def server(site: Site) -> Iterator[ServerProcess]:
    done = set_password(site)
    assert done.returncode == 0, done.stderr
    assert str(site.root / "console.db") in done.stdout
    proc = site.start_server()
    try:
        yield proc
    finally:
        proc.stop()


def test_the_password_is_never_taken_from_the_command_line(site: Site) -> None:
    short = set_password(site, "short")
    assert short.returncode == 1
    assert "at least 8 characters" in short.stderr
    argv = subprocess.run(
        [
            *(sys.executable, "-m", "frctl.main", "server", "admin-password"),
            *("--config", str(site.server_config), "--password", PASSWORD),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert argv.returncode != 0


async def test_the_console_shows_a_vm_replicated_into_the_server(
    site: Site, server: ServerProcess
) -> None:
    url = console_url(server)
    assert url.startswith(f"https://{SERVER_HOST}:")
    rng = random.Random(23)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "db-1.img"
    image.write_bytes(rng.randbytes(2 * MIB))
    replicator = site.replicator(vmid, "db-1", [image], server.port)
    with trio.fail_after(60):
        await replicator.cycle()
        with image.open("r+b") as f:
            f.write(rng.randbytes(8192))
        await replicator.cycle()
    trusted = ssl.create_default_context(cafile=str(site.certs / "ca.pem"))
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=url, verify=trusted, timeout=10) as client:
            login = await client.get("/login")
            assert login.status_code == 200
            assert "served by recovery server r1.example.com" in login.text
            assert login.headers["strict-transport-security"]
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf
            wrong = await client.post(
                "/login", data={"csrf": csrf.group(1), "user": "admin", "password": "nope"}
            )
            assert wrong.status_code == 401
            done = await client.post(
                "/login", data={"csrf": csrf.group(1), "user": "admin", "password": PASSWORD}
            )
            assert done.status_code == 303, done.text
            vms = await client.get("/vms")
            assert vms.status_code == 200
            assert "db-1" in vms.text
            assert str(vmid) in vms.text
            assert "complete" in vms.text
            one = await client.get(f"/vms/{vmid}")
            assert one.status_code == 200
            assert re.findall(r"<tr><td>(\d+)</td>", one.text)[:2] == ["1", "0"]
            # A test failover built by the running server's console, replication going on.
            built = await client.post(
                f"/vms/{vmid}/test-failover",
                data={"csrf": _csrf(one.text), "point": "0", "confirm": "yes"},
            )
            assert built.status_code == 200, built.text
            [copy] = list((site.root / "test-failovers").iterdir())
            assert (copy / "frrep-test-failover.json").is_file()
            settings = await client.get("/settings")
            assert "*.primary.example.com" in settings.text
            audit = await client.get("/audit")
            assert "password" in audit.text
            assert "(frctl)" in audit.text
            assert "test failover" in audit.text
    with trio.fail_after(60):
        with image.open("r+b") as f:
            f.write(rng.randbytes(8192))
        await replicator.cycle()  # replication goes on
    assert replicator.state.sequence == 2
    assert "console: admin logged in" in server.log.read_text()

"""One VMID, one replica per recovery server (docs/protocol.md REP-33, REP-34): a real
server process on loopback whose authorization gives two primaries of two trust groups a
storage location each. The second group's create of a VM the first holds is refused
NOT_AUTHORIZED and writes nothing in its storage; a VMID found in both locations at
start-up is refused until an operator removes one copy with ``frctl replica``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from frlink.certs import issue_host_cert
from frtesting.server import ServerProcess, start_server_process
from node.primary.client import RecoveryClient

from .site import PRIMARY_HOST, PRIMARY_NAME, SERVER_HOST, SERVER_NAME, Site

#: The second trust group's primary (a certificate of the same CA).
OTHER_NAME = "p2.other.example.org"
DISKS = (fp.DiskInfo("disk0", 1 << 20),)
ENTRY_A = f'primary = "{PRIMARY_NAME}"\nstorage = "replicas-a"\ntrust_group = "ga"'
ENTRY_B = f'primary = "{OTHER_NAME}"\nstorage = "replicas-b"\ntrust_group = "gb"'


def _config(site: Site, *entries: str) -> Path:
    """The server's configuration with these authorization entries (TOML bodies)."""
    text = f"""
[server]
name = "{SERVER_NAME}"
listen = "{SERVER_HOST}"
port = 0

[tls]
cert = "certs/{SERVER_NAME}.pem"
key = "certs/{SERVER_NAME}-key.pem"
ca = "certs/ca.pem"
"""
    for entry in entries:
        text += f"\n[[authorization]]\n{entry}\n"
    site.server_config.write_text(text)
    return site.server_config


def _start(site: Site, *entries: str) -> ServerProcess:
    return start_server_process(_config(site, *entries), site.root)


def _held(storage: Path) -> list[str]:
    """Everything a storage location holds besides its own bookkeeping directories: the
    replica directories, and anything left in staging."""
    if not storage.is_dir():
        return []
    out = [p.name for p in storage.iterdir() if not p.name.startswith(".")]
    staging = storage / ".staging"
    out += [f".staging/{p.name}" for p in staging.iterdir()] if staging.is_dir() else []
    return sorted(out)


def frctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "frctl.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


async def _client(site: Site, port: int, name: str) -> RecoveryClient:
    return await RecoveryClient.connect(
        SERVER_HOST,
        port,
        server_name=SERVER_NAME,
        ssl_context=site.client_context(name),
        local_address=PRIMARY_HOST,
        timeout=10,
    )


async def _replicate(site: Site, port: int, name: str, vmid: uuid.UUID, vm_name: str) -> None:
    """Create the VM's relationship as ``name`` and run its IR."""
    image = site.root / f"{vm_name}.img"
    image.write_bytes(os.urandom(DISKS[0].size))
    client = await _client(site, port, name)
    try:
        accepted = await client.open(vmid, name=vm_name, disks=DISKS)
        assert accepted.ir_state is fp.IRState.NOT_STARTED
        await client.send_ir(vmid, [image])
    finally:
        await client.aclose()


async def _refused(
    site: Site, port: int, name: str, vmid: uuid.UUID, *, create: bool
) -> fp.FrprotoError:
    """The refusal of a create (or open) of ``vmid`` as ``name``."""
    client = await _client(site, port, name)
    try:
        with pytest.raises(fp.FrprotoError) as refused:
            await client.open(vmid, name="evil", disks=DISKS, create=create)
        return refused.value
    finally:
        await client.aclose()


@pytest.fixture
def two_groups(site: Site) -> Site:
    issue_host_cert(site.certs, site.certs, OTHER_NAME, ip_addresses=[PRIMARY_HOST])
    return site


def test_another_trust_group_gets_not_authorized_and_nothing_is_written(two_groups: Site) -> None:
    site = two_groups
    vmid = uuid.uuid4()
    server = _start(site, ENTRY_A, ENTRY_B)
    try:

        async def main() -> None:
            await _replicate(site, server.port, PRIMARY_NAME, vmid, "web01")
            # The hostile second primary: its own storage, the same VMID, another name.
            for create in (True, False):
                refusal = await _refused(site, server.port, OTHER_NAME, vmid, create=create)
                assert isinstance(refusal, fp.NotAuthorized), refusal
                assert "'ga'" in str(refusal)
            # The refusal is a refusal (ERR-4): the same connection goes on, and a VM of
            # its own is created in its own storage.
            client = await _client(site, server.port, OTHER_NAME)
            try:
                with pytest.raises(fp.NotAuthorized):
                    await client.open(vmid, name="evil", disks=DISKS)
                own = uuid.uuid4()
                accepted = await client.open(own, name="own", disks=DISKS)
                assert accepted.vmid == own
            finally:
                await client.aclose()
            # The first group's primary still replicates it, from the same replica.
            client = await _client(site, server.port, PRIMARY_NAME)
            try:
                again = await client.open(vmid, name="web01", disks=DISKS, create=False)
                assert again.ir_state is fp.IRState.COMPLETE
            finally:
                await client.aclose()

        trio.run(main)
    finally:
        server.stop()
    assert _held(site.root / "replicas-a") == [str(vmid)]
    assert str(vmid) not in _held(site.root / "replicas-b")
    assert len(_held(site.root / "replicas-b")) == 1  # only its own VM
    listed = json.loads(
        frctl("replica", "list", "--config", str(site.server_config), "--json").stdout
    )
    holders = [(r["name"], r["trust_group"]) for r in listed if r["vmid"] == str(vmid)]
    assert holders == [("web01", "ga")]
    none = frctl("replica", "duplicates", "--config", str(site.server_config))
    assert none.returncode == 0, none.stderr
    assert "no VMID" in none.stdout


def test_a_vmid_in_two_locations_is_refused_until_an_operator_removes_one(
    two_groups: Site,
) -> None:
    site = two_groups
    vmid = uuid.uuid4()
    # Two copies made behind the server's back: each location served alone in turn (as
    # an authorization entry pointed elsewhere, or storage restored from a backup would).
    for entry, name, vm_name in ((ENTRY_A, PRIMARY_NAME, "web01"), (ENTRY_B, OTHER_NAME, "evil")):
        alone = _start(site, entry)
        try:
            trio.run(_replicate, site, alone.port, name, vmid, vm_name)
        finally:
            alone.stop()
    a, b = site.root / "replicas-a", site.root / "replicas-b"
    assert _held(a) == _held(b) == [str(vmid)]
    server = _start(site, ENTRY_A, ENTRY_B)
    config = str(site.server_config)
    try:
        # Said at start-up, with both places.
        assert server.wait_for_log(f"VM {vmid} has a replica in 2 storage locations")
        log = server.log.read_text()
        assert str(a) in log
        assert str(b) in log

        async def both_refused() -> None:
            for name, create in ((PRIMARY_NAME, False), (PRIMARY_NAME, True), (OTHER_NAME, True)):
                refusal = await _refused(site, server.port, name, vmid, create=create)
                assert isinstance(refusal, fp.Busy), refusal
                assert "operator" in str(refusal)

        trio.run(both_refused)
        # The operator sees both copies: storage, trust group, name, last sequence.
        shown = frctl("replica", "duplicates", "--config", config, "--json")
        assert shown.returncode == 3, shown.stderr
        copies = {
            (c["storage"], c["trust_group"], c["name"], c["applied_sequence"])
            for c in json.loads(shown.stdout)
        }
        assert copies == {(str(a), "ga", "web01", 0), (str(b), "gb", "evil", 0)}
        table = frctl("replica", "duplicates", "--config", config)
        for word in (str(vmid), "evil", "web01", "gb"):
            assert word in table.stdout, table.stdout
        # Not without --yes.
        unsure = frctl(
            "replica", "remove-duplicate", "--config", config, str(vmid), "--storage", str(b)
        )
        assert unsure.returncode == 1
        assert "--yes" in unsure.stderr
        assert _held(b) == [str(vmid)]
        removed = frctl(
            "replica",
            "remove-duplicate",
            "--config",
            config,
            str(vmid),
            "--storage",
            str(b),
            "--yes",
        )
        assert removed.returncode == 0, removed.stderr
        assert "evil" in removed.stdout
        assert _held(b) == []
        assert _held(a) == [str(vmid)]
        # Never the last copy.
        last = frctl(
            "replica",
            "remove-duplicate",
            "--config",
            config,
            str(vmid),
            "--storage",
            str(a),
            "--yes",
        )
        assert last.returncode == 1
        assert "only copy" in last.stderr
        assert _held(a) == [str(vmid)]

        # Resolved: served again at once (no restart), bound to its trust group.
        async def resolved() -> None:
            client = await _client(site, server.port, PRIMARY_NAME)
            try:
                accepted = await client.open(vmid, name="web01", disks=DISKS, create=False)
                assert accepted.ir_state is fp.IRState.COMPLETE
            finally:
                await client.aclose()
            refusal = await _refused(site, server.port, OTHER_NAME, vmid, create=True)
            assert isinstance(refusal, fp.NotAuthorized), refusal

        trio.run(resolved)
    finally:
        server.stop()
    assert _held(b) == []
    assert frctl("replica", "duplicates", "--config", config).returncode == 0

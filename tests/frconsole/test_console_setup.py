"""Setting the console up: ``frctl cluster admin-password`` and the ``[console]`` table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from broker.cluster_view import read_audit, read_console_account
from broker.records import Keys
from broker.store import open_store
from frcluster.config import load_cluster_node_config
from frlink.config import ConfigError
from frlink.passwords import verify_password

NODE_TOML = """
[node]
name = "n1.example.com"
listen = "127.0.0.11"
storage = "storage"
[cluster]
store = "sqlite://cluster.db"
cap_name = "cap.example.com"
[tls]
cert = "c.pem"
key = "k.pem"
ca = "ca.pem"
"""


def _admin_password(tmp_path: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "frctl.main", "cluster", "admin-password"),
            *("--store", f"sqlite://{tmp_path / 'cluster.db'}", *extra),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_admin_password_reads_stdin_and_refuses_a_short_one(tmp_path: Path) -> None:
    short = _admin_password(tmp_path, "short\n")
    assert short.returncode == 1
    assert short.stderr == "frctl: the password must have at least 8 characters\n"
    done = _admin_password(tmp_path, "a long password\n", "--user", "root-admin")
    assert done.returncode == 0, done.stderr
    assert "root-admin: password set" in done.stdout

    async def check() -> None:
        async with open_store(f"sqlite://{tmp_path / 'cluster.db'}") as store:
            account = await read_console_account(store, Keys())
            assert account is not None
            assert account.user == "root-admin"
            assert verify_password("a long password", account.password_hash)
            (entry,) = await read_audit(store, Keys())
            assert entry.what == "password"
            assert entry.who.endswith("(frctl)")

    trio.run(check)


def test_the_console_table(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(NODE_TOML)
    assert load_cluster_node_config(path).console_port is None  # absent: no console
    path.write_text(NODE_TOML + "[console]\nport = 9443\n")
    config = load_cluster_node_config(path)
    assert config.console_port == 9443
    assert config.console_listen == ""
    path.write_text(NODE_TOML + '[console]\nport = "x"\n')
    with pytest.raises(ConfigError, match=r"node.toml:14: \[console\] 'port' must be a whole"):
        load_cluster_node_config(path)
    path.write_text(NODE_TOML + "[console]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"\[console\]: 'port' must be 0-65535"):
        load_cluster_node_config(path)
    path.write_text(NODE_TOML + "[console]\nprot = 9443\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot' \(did you mean 'port'\?\)"):
        load_cluster_node_config(path)


def test_changes_made_with_frctl_are_in_the_audit_log(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'cluster.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "frctl.main",
            "cluster",
            "settings",
            *("--store", url),
            "recovery_points=5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    async def check() -> None:
        async with open_store(url) as store:
            (entry,) = await read_audit(store, Keys())
            assert entry.what == "settings"
            assert entry.changes == {"recovery_points": [24, 5]}
            assert entry.who.endswith("(frctl)")

    trio.run(check)

"""The systemd units in packaging/systemd/ start what frctl really has: their ExecStart
parses with frctl's own parser, readiness is the notify kind the daemons send, the config
check runs on the file the service reads, and the hardening is there."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from frctl.main import build_parser

UNITS = Path(__file__).resolve().parent.parent / "packaging" / "systemd"
EXPECTED = {
    "frrep-server.service": ("server", "server.toml"),
    "frrep-node.service": ("node", "node.toml"),
    "frrep-primary.service": ("primary", "primary.toml"),
}


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_there_is_a_unit_for_each_service() -> None:
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(EXPECTED)


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_a_unit_runs_its_service_as_frctl_parses_it(unit: str) -> None:
    command, config = EXPECTED[unit]
    d = _directives(UNITS / unit)
    assert d["Type"] == ["notify"]
    start = shlex.split(d["ExecStart"][0])
    assert start[0].endswith("/frctl")
    assert start[1:3] == [command, "run"]
    assert start[-1] == f"%E/frrep/{config}"
    args = build_parser().parse_args(start[1:])
    assert args.func.__name__.endswith("_run")
    assert d["ExecStartPre"] == [f"{start[0]} config check %E/frrep/{config}"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["ReadWritePaths"] == ["/var/lib/frrep"]
    assert d["WantedBy"] == ["multi-user.target"]


def test_only_the_recovery_server_reloads() -> None:
    reloads = {u: _directives(UNITS / u).get("ExecReload") for u in EXPECTED}
    assert reloads == {
        "frrep-server.service": ["/bin/kill -HUP $MAINPID"],
        "frrep-node.service": None,
        "frrep-primary.service": None,
    }

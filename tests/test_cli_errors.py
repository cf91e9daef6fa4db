"""frctl without tracebacks: every expected failure is one ``frctl: ...`` line on stderr
with its documented exit code; ``--debug`` shows the traceback; ``--version``;
``python -m frctl``; ``frctl config check``."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import frctl.main
from frctl.main import main
from frlink.certs import create_ca, issue_host_cert
from node.primary.operations import EnableRequest, enable
from node.primary.state import PrimaryStateStore

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def primary(tmp_path: Path) -> Path:
    """A primary's config with one enabled VM, ``web01`` (no server needed)."""
    certs = tmp_path / "certs"
    create_ca(certs)
    issue_host_cert(certs, certs, "p1.example.com")
    config = tmp_path / "primary.toml"
    config.write_text(
        """
[primary]
name = "p1.example.com"
state_dir = "state"

[tls]
cert = "certs/p1.example.com.pem"
key = "certs/p1.example.com-key.pem"
ca = "certs/ca.pem"
"""
    )
    image = tmp_path / "d0.img"
    image.write_bytes(b"\1" * 65536)
    request = EnableRequest(str(uuid.uuid4()), "web01", [f"d0={image}"], "127.0.0.2:1")
    enable(PrimaryStateStore(tmp_path / "state"), request)
    return config


@pytest.mark.parametrize(
    "argv",
    [
        ["primary", "run", "--config", "{missing}"],
        ["replica", "list", "--config", "{missing}"],
        ["replica", "points", "--config", "{missing}", "web01"],
        ["replica", "duplicates", "--config", "{missing}"],
        [
            "replica",
            "remove-duplicate",
            "--config",
            "{missing}",
            "0" * 32,
            "--storage",
            "x",
            "--yes",
        ],
        [
            "replica",
            "quarantine",
            "--config",
            "{missing}",
            "0" * 32,
            "--storage",
            "x",
            "--yes",
        ],
        ["replication", "pause", "--config", "{missing}", "web01"],
        ["replication", "verify", "--config", "{missing}", "web01"],
        ["server", "run", "--config", "{missing}"],
        ["node", "run", "--config", "{missing}"],
        ["config", "check", "{missing}"],
    ],
)
def test_a_missing_config_file_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    missing = str(tmp_path / "nope.toml")
    code, _, err = run(capsys, *(a.format(missing=missing) for a in argv))
    assert code == 1
    assert err == f"frctl: {missing}: No such file or directory\n"


def test_bad_toml_says_where(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nname = 1\n")
    code, _, err = run(capsys, "server", "run", "--config", str(bad))
    assert code == 1
    assert err.startswith(f"frctl: {bad}: not valid TOML: ")
    assert "line 1" in err


@pytest.mark.parametrize("command", ["pause", "resume", "disable", "verify", "resync", "set"])
def test_an_unknown_vm_exits_4(
    capsys: pytest.CaptureFixture[str], primary: Path, command: str
) -> None:
    extra = ["--frequency", "1m"] if command == "set" else []
    unknown = str(uuid.uuid4())
    code, _, err = run(capsys, "replication", command, "--config", str(primary), unknown, *extra)
    assert (code, err) == (4, f"frctl: VM {unknown} is not enabled for replication here\n")
    code, _, err = run(capsys, "replication", command, "--config", str(primary), "db99", *extra)
    assert (code, err) == (4, "frctl: no VM 'db99' is enabled for replication here\n")


def test_an_ambiguous_name_is_refused(capsys: pytest.CaptureFixture[str], primary: Path) -> None:
    image = primary.parent / "d1.img"
    image.write_bytes(b"\2" * 65536)
    twin = EnableRequest(str(uuid.uuid4()), "web01", [f"d0={image}"], "127.0.0.2:1")
    enable(PrimaryStateStore(primary.parent / "state"), twin)
    code, _, err = run(capsys, "replication", "pause", "--config", str(primary), "web01")
    assert code == 4
    assert "2 VMs are named 'web01'; give the VMID" in err


def test_the_vm_by_name_for_verify_reaches_the_network(
    capsys: pytest.CaptureFixture[str], primary: Path
) -> None:
    """The name resolved (no 'not enabled', no traceback): verify fails at the server."""
    code, _, err = run(capsys, "replication", "verify", "--config", str(primary), "web01")
    assert code == 1
    assert err.startswith("frctl: verify: ")
    assert "not enabled" not in err


def test_ir_export_takes_a_name(capsys: pytest.CaptureFixture[str], primary: Path) -> None:
    out_file = primary.parent / "web01.frir"
    code, out, err = run(
        capsys, "ir", "export", "--config", str(primary), "web01", "--out", str(out_file), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["name"] == "web01"
    code, _, err = run(
        capsys, "ir", "export", "--config", str(primary), "db99", "--out", str(out_file)
    )
    assert code == 4


def test_actions_say_what_they_did_in_json(
    capsys: pytest.CaptureFixture[str], primary: Path
) -> None:
    code, out, _ = run(
        capsys,
        "replication",
        "set",
        "--config",
        str(primary),
        "web01",
        "--frequency",
        "30s",
        "--json",
    )
    assert code == 0
    done = json.loads(out)
    assert (done["action"], done["name"], done["frequency_s"]) == ("set", "web01", 30.0)
    code, out, _ = run(capsys, "replication", "pause", "--config", str(primary), "web01", "--json")
    assert (code, json.loads(out)["action"], json.loads(out)["paused"]) == (0, "pause", True)
    code, out, _ = run(
        capsys, "replication", "disable", "--config", str(primary), "web01", "--json"
    )
    assert (code, json.loads(out)["action"]) == (0, "disable")


def test_set_refuses_recovery_points_and_a_bad_compression(
    capsys: pytest.CaptureFixture[str], primary: Path
) -> None:
    code, _, err = run(
        capsys, "replication", "set", "--config", str(primary), "web01", "--recovery-points", "5"
    )
    assert code == 1
    assert "recovery points are kept by the recovery side" in err
    assert "recovery_points=5" in err
    code, _, err = run(
        capsys, "replication", "set", "--config", str(primary), "web01", "--compression", "gzip"
    )
    assert (code, err) == (1, "frctl: set: --compression: 'gzip' is not zstd, lz4 or none\n")
    code, out, _ = run(
        capsys, "replication", "set", "--config", str(primary), "web01", "--compression", "zstd"
    )
    assert (code, out) == (
        0,
        "replication/web01: frequency 300 s, bandwidth limit none, compression zstd\n",
    )


def test_enable_refuses_an_enabled_vm(capsys: pytest.CaptureFixture[str], primary: Path) -> None:
    state = PrimaryStateStore(primary.parent / "state").all()[0]
    code, _, err = run(
        capsys,
        "replication",
        "enable",
        "--config",
        str(primary),
        "--vmid",
        state.vmid,
        "--name",
        "web01",
        "--disk",
        f"d0={primary.parent / 'd0.img'}",
        "--server",
        "h:1",
        "--frequency",
        "1m",
    )
    assert code == 1
    assert "is already enabled" in err
    assert PrimaryStateStore(primary.parent / "state").load(state.vmid).frequency_s == 300.0


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(frctl.main, "_cmd_version", broken)
    code, _, err = run(capsys, "version")
    assert code == 1
    assert err.splitlines() == [
        "frctl: unexpected error: RuntimeError: something nobody expected",
        "frctl: this is a bug; rerun with --debug for the traceback",
    ]
    assert main(["--debug", "version"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "something nobody expected" in err


def test_interrupted_exits_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(frctl.main, "_cmd_version", interrupted)
    assert run(capsys, "version")[0] == 130


def test_version_and_python_m_frctl() -> None:
    for argv in (["-m", "frctl", "--version"], ["-m", "frctl.main", "--version"]):
        done = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert re.fullmatch(r"frctl \d+\.\d+\.\d+.*\n", done.stdout)
    usage = subprocess.run(
        [sys.executable, "-m", "frctl"], capture_output=True, text=True, timeout=60, check=False
    )
    assert usage.returncode == 2
    assert "usage: frctl" in usage.stderr


# -- frctl config check ------------------------------------------------------------


SERVER = """\
[server]
name = "r1.example.com"
port = 7443

[tls]
cert = "certs/r1.pem"
key = "certs/r1-key.pem"
ca = "certs/ca.pem"

[[authorization]]
primary = "*.primary.example.com"
storage = "replicas"
trust_group = "site-a"
"""


def test_config_check_accepts_a_good_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER)
    create_ca(tmp_path / "certs")
    issue_host_cert(tmp_path / "certs", tmp_path / "certs", "r1")
    code, out, _ = run(capsys, "config", "check", str(path))
    assert (code, out) == (0, f"{path}: a recovery server's configuration, OK\n")
    code, out, _ = run(capsys, "config", "check", str(path), "--json")
    assert json.loads(out) == {"file": str(path), "kind": "server", "ok": True}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (("port = 7443", "prot = 7444"), ":3: [server] unknown key 'prot' (did you mean 'port'?)"),
        (
            ("port = 7443", 'port = "7443"'),
            ":3: [server] 'port' must be a whole number, not \"7443\"",
        ),
        (("[tls]", "[tsl]"), ":5: unknown table 'tsl' (did you mean 'tls'?)"),
        (("trust_group", "trust_grp"), ":13: [[authorization]] #1 unknown key 'trust_grp'"),
        (("port = 7443", "port = 70000"), "[server] port must be 0-65535"),
    ],
)
def test_config_check_refuses_with_the_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, change: tuple[str, str], said: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(SERVER.replace(*change))
    code, _, err = run(capsys, "config", "check", str(path), "--no-tls")
    assert code == 1
    assert err.startswith(f"frctl: {path}")
    assert said in err
    # The service refuses it at start with the same words.
    code, _, started = run(capsys, "server", "run", "--config", str(path))
    assert (code, started) == (1, err)


def test_config_check_refuses_a_file_of_no_kind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[srever]\nname = "x"\n')
    code, _, err = run(capsys, "config", "check", str(path))
    assert code == 1
    assert "not a frrep configuration" in err


def _examples() -> list[tuple[str, str]]:
    """Every sample configuration in the docstrings and docs: (where, TOML text)."""
    import frcluster.config
    import node.config
    import node.primary.config

    found = []
    for owner in (node.config, node.primary.config.PrimaryConfig, frcluster.config):
        text = inspect.getdoc(owner) or ""
        block = text.split("Example::", 1)[1].split("\n\n", 1)[1]
        lines = []
        for line in block.splitlines():
            if line.strip() and not line.startswith("    "):
                break
            lines.append(line[4:])
        found.append((getattr(owner, "__name__", "?"), "\n".join(lines)))
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        for block in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            if re.search(r"^\[(server|primary|node)\]", block, re.M):
                found.append((doc.name, block))
    return found


def test_every_sample_configuration_passes_the_key_check(tmp_path: Path) -> None:
    from frctl.config_commands import _loader, detect_kind

    examples = _examples()
    assert len(examples) >= 4, examples
    for where, text in examples:
        path = tmp_path / "sample.toml"
        path.write_text(text)
        _loader(detect_kind(path))(path)  # raises ConfigError with the line
        assert where


def test_cert_commands_say_what_they_wrote_in_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    code, out, _ = run(capsys, "cert", "ca", "create", "--dir", str(ca), "--json")
    created = json.loads(out)
    assert (code, created["action"], created["cert"]) == (0, "ca create", str(ca / "ca.pem"))
    code, out, _ = run(
        capsys, "cert", "issue", "r1", "--ca", str(ca), "--out", str(tmp_path), "--json"
    )
    issued = json.loads(out)
    assert (code, issued["action"], len(issued["wrote"])) == (0, "cert issue", 3)
    code, out, _ = run(capsys, "cert", "show", str(tmp_path / "r1.pem"), "--json")
    shown = json.loads(out)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown["not_after"])


@pytest.mark.parametrize("sample", ["server.toml", "primary.toml", "node.toml"])
def test_config_check_accepts_the_examples(capsys: pytest.CaptureFixture[str], sample: str) -> None:
    path = ROOT / "examples" / sample
    code, out, _ = run(capsys, "config", "check", str(path), "--no-tls")
    assert code == 0
    assert out.endswith("configuration, OK\n")


def test_a_server_whose_port_is_taken_says_which(tmp_path: Path) -> None:
    import socket

    create_ca(tmp_path / "certs")
    issue_host_cert(tmp_path / "certs", tmp_path / "certs", "r1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.2", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "server.toml"
        path.write_text(SERVER.replace("port = 7443", f'listen = "127.0.0.2"\nport = {port}'))
        done = subprocess.run(
            [sys.executable, "-m", "frctl", "server", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith(
        f"frctl: cannot listen on 127.0.0.2:{port}: Address already in use\n"
    )

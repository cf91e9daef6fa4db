"""``frctl replication test-connection`` against a real recovery server process: every
step OK, and each failure with its reason (server down, our certificate not trusted, our
name not authorized)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from frctl.main import main
from frlink.certs import create_ca, issue_host_cert
from node.primary.operations import EnableRequest, enable
from node.primary.state import PrimaryStateStore

from .site import PRIMARY_NAME, SERVER_HOST, SERVER_NAME, Site


def probe(
    capsys: pytest.CaptureFixture[str], config: Path, *target: str
) -> tuple[int, dict[str, dict[str, object]]]:
    code = main(["replication", "test-connection", "--config", str(config), *target, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    report = json.loads(out)
    assert report["ok"] is (code == 0)
    return code, {s["step"]: s for s in report["steps"]}


def _server(port: int) -> list[str]:
    return ["--server", f"{SERVER_HOST}:{port}", "--server-name", SERVER_NAME]


def test_every_step_passes_then_the_server_goes_down(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site.write_primary_config()
    server = site.start_server()
    try:
        code, steps = probe(capsys, config, *_server(server.port))
        assert code == 0
        assert list(steps) == ["reach", "tls", "negotiation", "authorization"]
        assert all(s["ok"] for s in steps.values())
        assert "a stand-alone recovery server" in str(steps["negotiation"]["detail"])

        # A VM by name: its configured target is tested.
        image = site.root / "d0.img"
        image.write_bytes(b"\1" * 65536)
        enable(
            PrimaryStateStore(site.state_dir),
            EnableRequest(
                str(uuid.uuid4()),
                "web01",
                [f"d0={image}"],
                f"{SERVER_HOST}:{server.port}",
                server_name=SERVER_NAME,
            ),
        )
        assert probe(capsys, config, "web01")[0] == 0
        assert main(["replication", "test-connection", "--config", str(config), "web01"]) == 0
        text = capsys.readouterr().out
        assert f"testing the connection to {SERVER_NAME} at {SERVER_HOST}:{server.port}" in text
        assert "  authorization  OK" in text
    finally:
        server.stop()
    code, steps = probe(capsys, config, *_server(server.port))
    assert code == 1
    assert list(steps) == ["reach"]
    assert "Connection refused" in str(steps["reach"]["detail"])


def test_a_primary_the_server_does_not_authorize(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.write_server_config(primary="other.primary.example.com")
    server = site.start_server()
    try:
        code, steps = probe(capsys, site.write_primary_config(), *_server(server.port))
    finally:
        server.stop()
    assert code == 1
    assert [(n, s["ok"]) for n, s in steps.items()] == [
        ("reach", True),
        ("tls", True),
        ("negotiation", True),
        ("authorization", False),
    ]
    assert "does not admit this primary" in str(steps["authorization"]["detail"])


def test_a_certificate_from_another_ca(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The server does not trust our certificate (TLS 1.3: said at the first read)."""
    other = tmp_path / "other-ca"
    create_ca(other)
    issue_host_cert(other, other, PRIMARY_NAME)
    config = site.write_primary_config()
    text = config.read_text()
    text = text.replace(
        f'cert = "certs/{PRIMARY_NAME}.pem"', f'cert = "{other}/{PRIMARY_NAME}.pem"'
    )
    text = text.replace(
        f'key = "certs/{PRIMARY_NAME}-key.pem"', f'key = "{other}/{PRIMARY_NAME}-key.pem"'
    )
    config.write_text(text)
    server = site.start_server()
    try:
        code, steps = probe(capsys, config, *_server(server.port))
        # And a server name its certificate does not have: we refuse the server.
        wrong = ["--server", f"{SERVER_HOST}:{server.port}", "--server-name", "r9.example.com"]
        code_name, steps_name = probe(capsys, site.write_primary_config(), *wrong)
    finally:
        server.stop()
    assert code == 1
    assert steps["tls"]["ok"] is False
    assert "the server refused our certificate" in str(steps["tls"]["detail"])
    assert code_name == 1
    assert steps_name["tls"]["ok"] is False
    assert "the server's certificate" in str(steps_name["tls"]["detail"])


def test_at_a_clusters_cap_the_broker_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from frtesting.cluster import CAP_ADDRESS, CAP_NAME, PRIMARY_ADDRESS, ClusterSite
    from frtesting.cluster import PRIMARY_NAME as CLUSTER_PRIMARY

    site = ClusterSite(tmp_path / "cluster", nodes=1)
    config = tmp_path / "primary.toml"
    config.write_text(
        f"""
[primary]
name = "{CLUSTER_PRIMARY}"
state_dir = "state"
local_address = "{PRIMARY_ADDRESS}"

[tls]
cert = "{site.certs}/{CLUSTER_PRIMARY}.pem"
key = "{site.certs}/{CLUSTER_PRIMARY}-key.pem"
ca = "{site.certs}/ca.pem"
"""
    )
    cap = ["--server", f"{CAP_ADDRESS}:{site.cap_port}", "--server-name", CAP_NAME]
    try:
        site.start_all()
        site.broker_node()
        site.authorize_primary()
        code, steps = probe(capsys, config, *cap)
    finally:
        site.stop_all()
    assert code == 0
    assert list(steps) == ["reach", "tls", "negotiation", "authorization", "broker"]
    assert "a clustering broker" in str(steps["negotiation"]["detail"])
    assert steps["broker"]["ok"] is True

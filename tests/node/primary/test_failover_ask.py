"""The primary's answer to a planned failover asked at the recovery side (FailoverAsk,
``node/primary/failover_ask.py``): declined without a stop hook or when the hook fails,
with the reason; handed over (nothing sent yet) once the hook stopped the VM; a failed
hand-over declined at the next ask; ``[failover]`` read from the primary's file."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from frlink.config import ConfigError
from node.failover.asked import AskedFailover
from node.primary.config import load_primary_config
from node.primary.failover_ask import NO_STOP_HOOK, AskState, answer_ask

VMID = uuid.UUID("6f1b7c1e-3a52-4c8e-9d0a-2f4b1e7c9a10")


class _Client:
    """What answer_ask uses of a RecoveryClient: the ask seen at open, and the decline."""

    def __init__(self, asked: uuid.UUID | None) -> None:
        self.failover_asked = asked
        self.declined: list[tuple[uuid.UUID, str]] = []

    async def decline_failover(self, vmid: uuid.UUID, reason: str) -> None:
        self.declined.append((vmid, reason))
        self.failover_asked = None


async def _answer(handler: Any, state: AskState, asked: uuid.UUID | None = VMID) -> _Client:
    client = _Client(asked)
    await answer_ask(handler, state, client, VMID, [Path("/dev/null")])  # type: ignore[arg-type]
    return client


async def test_not_asked_nothing_is_sent() -> None:
    state = AskState()
    assert (await _answer(None, state, asked=None)).declined == []
    assert (await _answer(None, state, asked=uuid.uuid4())).declined == []
    assert not state.handing_over


async def test_no_stop_hook_declines() -> None:
    client = await _answer(None, AskState())
    assert client.declined == [(VMID, NO_STOP_HOOK)]
    assert "stop_command" in NO_STOP_HOOK


async def test_a_failing_stop_hook_declines_with_its_message(tmp_path: Path) -> None:
    state = AskState()
    client = await _answer(AskedFailover("echo it is busy >&2; exit 4"), state)
    [(vmid, reason)] = client.declined
    assert vmid == VMID
    assert "exited 4" in reason
    assert "it is busy" in reason
    assert not state.handing_over


async def test_a_stop_hook_that_stops_the_vm_leads_to_the_hand_over(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    handler = AskedFailover(f'echo "$FRREP_VMID $FRREP_DISKS" > {seen}')
    state = AskState()
    client = await _answer(handler, state)
    assert client.declined == []  # the FailoverRequest of the hand-over answers it
    assert state.handing_over
    assert seen.read_text().split() == [str(VMID), "/dev/null"]
    # The hand-over's own connections are asked again: nothing is stopped twice.
    seen.unlink()
    assert (await _answer(handler, state)).declined == []
    assert not seen.exists()


async def test_a_failed_hand_over_is_declined_at_the_next_ask(tmp_path: Path) -> None:
    state = AskState(decline_next="the planned failover failed at the primary: differs")
    handler = AskedFailover(f"touch {tmp_path / 'ran'}")
    client = await _answer(handler, state)
    assert client.declined == [(VMID, "the planned failover failed at the primary: differs")]
    assert not (tmp_path / "ran").exists()  # not stopped again for it
    assert state.decline_next is None  # the next ask is carried out again


async def test_a_vm_not_ready_is_declined_before_it_is_stopped(tmp_path: Path) -> None:
    client = _Client(VMID)
    handler = AskedFailover(f"touch {tmp_path / 'ran'}")
    state = AskState()
    await answer_ask(handler, state, client, VMID, [], not_ready="IR not done")  # type: ignore[arg-type]
    assert client.declined == [(VMID, "IR not done")]
    assert not (tmp_path / "ran").exists()
    assert not state.handing_over


def _primary_file(tmp_path: Path, failover: str) -> Path:
    path = tmp_path / "primary.toml"
    path.write_text(
        '[primary]\nname = "p1.example.com"\nstate_dir = "state"\n'
        '[tls]\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n' + failover
    )
    return path


def test_the_failover_table_of_the_primary_file(tmp_path: Path) -> None:
    config = load_primary_config(_primary_file(tmp_path, ""))
    assert config.failover_stop_command is None
    assert config.failover_server_config is None
    assert config.failover_reverse_port == 0
    config = load_primary_config(
        _primary_file(
            tmp_path,
            '[failover]\nstop_command = "virsh shutdown $FRREP_VMID"\n'
            'server_config = "server.toml"\nreverse_port = 7443\n',
        )
    )
    assert config.failover_stop_command == "virsh shutdown $FRREP_VMID"
    assert config.failover_server_config == tmp_path / "server.toml"
    assert config.failover_reverse_port == 7443
    with pytest.raises(ConfigError, match="reverse_port"):
        load_primary_config(_primary_file(tmp_path, "[failover]\nreverse_port = 70000\n"))

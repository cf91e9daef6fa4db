"""A planned failover whose FailoverDone was lost is run again safely (FOV-11), with a real
recovery server process and the loopback fault proxy between it and the primary.

The proxy cuts the connection just after the server sent FailoverDone: the server failed
the VM over durably (generation 2), the primary never read the answer. The primary then
holds the request in doubt, says so in status, replicates no more, and the same command
run again (``frctl failover planned``) re-sends only the request, in repeat-only mode:
FailoverDone at the same generation, the replica unchanged. After the failed-over VM
wrote at the recovery side, the repeat is refused and nothing changes there.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import frproto as fp
from frtesting.fault_proxy import Fault, FaultKind, FaultProxy
from frtesting.server import start_server_process
from node.config import load_recovery_server_config
from node.failover.planned import planned_failover
from node.primary.client import RecoveryClient
from node.primary.errors import FailoverInDoubt
from node.primary.replicator import VMReplicator
from node.storage.layout import ReplicaLayout

from .site import SERVER_HOST, Site
from .test_cli_replication import frctl
from .test_planned_failover_e2e import a_server_config
from .test_replication_e2e import MIB

#: The proxy's address: another loopback "host" between the primary and the server.
PROXY_HOST = "127.0.0.4"
BLOCK = 65536


class _NoFault:
    """The proxy's schedule: no fault of its own (the test arms the one it wants)."""

    def next_fault(self, triggered: Any) -> Fault | None:
        return None


def _lose_the_answer(monkeypatch: pytest.MonkeyPatch, proxy: FaultProxy) -> list[int]:
    """The next FailoverRequest's answer is lost: the proxy is armed, in-process, right
    before the request goes out (its bytes are the primary's last before the answer)."""
    armed: list[int] = []
    original: Callable[..., Awaitable[fp.FailoverDone]] = RecoveryClient.fail_over

    async def fail_over(self: RecoveryClient, request: fp.FailoverRequest) -> fp.FailoverDone:
        if not armed:
            armed.append(proxy.truncate_next_answer())
        return await original(self, request)

    monkeypatch.setattr(RecoveryClient, "fail_over", fail_over)
    return armed


def _replica_state(site: Site, vmid: uuid.UUID) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((site.storage / str(vmid) / "state.json").read_text())
    return doc


async def _frctl(*args: str) -> Any:
    """frctl in its own process, while this test's trio loop goes on carrying the proxy."""
    return await trio.to_thread.run_sync(lambda: frctl(*args))


async def _status_row(site: Site) -> dict[str, Any]:
    done = await _frctl(
        "replication", "status", "--config", str(site.write_primary_config()), "--json"
    )
    row: dict[str, Any] = json.loads(done.stdout)["vms"][0]
    return row


async def _in_doubt(
    site: Site, monkeypatch: pytest.MonkeyPatch, proxy: FaultProxy, vmid: uuid.UUID, image: Path
) -> VMReplicator:
    """Replicate the VM (IR, a batch), then fail it over with the answer lost."""
    rng = random.Random(vmid.int)
    replicator = site.replicator(vmid, "web01", [image], proxy.port, host=PROXY_HOST)
    await replicator.cycle()  # the IR
    with image.open("r+b") as f:
        for block in (2, 9, 30):
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
    await replicator.cycle()  # batch 1
    armed = _lose_the_answer(monkeypatch, proxy)
    with pytest.raises(FailoverInDoubt, match="failover in doubt"):
        await planned_failover(replicator)
    assert armed == [1]
    assert proxy.triggered[FaultKind.TRUNCATE] == 1
    return replicator


async def test_a_lost_failover_done_is_in_doubt_and_the_rerun_finishes_it(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(2011)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(4 * MIB))
    server = site.start_server()
    proxy = FaultProxy(PROXY_HOST, SERVER_HOST, server.port, _NoFault())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            replicator = await _in_doubt(site, monkeypatch, proxy, vmid, image)
            # The server failed over durably before it answered (FOV-6)...
            b_state = _replica_state(site, vmid)
            assert b_state["failed_over"] is True
            assert b_state["generation"] == 2
            # ... the primary knows only that it asked, and says so.
            state = replicator.store.load(str(vmid))
            assert state.failover_in_doubt is not None
            assert state.failover_in_doubt["generation"] == 1
            assert state.failover_in_doubt["sequence"] == 1
            assert state.failed_over_generation == 0
            row = await _status_row(site)
            assert row["state"] == "failover in doubt"
            assert row["health"] == "critical"
            assert [r["code"] for r in row["reasons"]] == ["failover-in-doubt"]
            # It replicates no more: a cycle is refused before anything is read or sent.
            with image.open("r+b") as f:
                f.seek(5 * BLOCK)
                f.write(rng.randbytes(BLOCK))
            with pytest.raises(FailoverInDoubt):
                await site.restarted(replicator).cycle()
            connections = proxy.counts()["connections"]
            # The re-run refuses while the disks differ from the state handed over...
            refused = await _frctl(
                "failover", "planned", "--config", str(site.write_primary_config()), "web01"
            )
            assert refused.returncode == 3, refused.stderr
            assert "disks changed" in refused.stderr
            assert proxy.counts()["connections"] == connections  # nothing was asked
            # ... and once they are as they were (the stray write undone), asks again,
            # exactly: FailoverDone at the same generation, no stop hook run.
            replica = ReplicaLayout(site.storage, vmid).image("disk0")
            with image.open("r+b") as f:
                f.seek(5 * BLOCK)
                f.write(replica.read_bytes()[5 * BLOCK : 6 * BLOCK])
            final = image.read_bytes()
            assert replica.read_bytes() == final
            done = await _frctl(
                "failover", "planned", "--config", str(site.write_primary_config()), "web01",
                "--stop-command", "exit 9", "--json",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert (result["generation"], result["sequence"], result["asked_again"]) == (2, 1, True)
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    # Nothing changed at the recovery side: the same failover, the same disk.
    b_state = _replica_state(site, vmid)
    assert (b_state["failed_over"], b_state["generation"]) == (True, 2)
    assert b_state["applied_sequence"] == 1
    assert ReplicaLayout(site.storage, vmid).image("disk0").read_bytes() == final
    assert f"planned failover of {vmid} repeated" in server.log.read_text()
    # The primary finished as a planned failover: failed over, not in doubt, halted.
    state = replicator.store.load(str(vmid))
    assert state.failover_in_doubt is None
    assert state.failed_over_generation == 2
    assert state.halted is not None
    row = await _status_row(site)
    assert row["state"] == "failed over"
    assert row["failover"] == {"generation": 2}


async def test_a_rerun_after_the_failed_over_vm_wrote_is_refused(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(2012)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(4 * MIB))
    server = site.start_server()
    proxy = FaultProxy(PROXY_HOST, SERVER_HOST, server.port, _NoFault())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            replicator = await _in_doubt(site, monkeypatch, proxy, vmid, image)
            # The VM runs at the recovery side now and writes there.
            b_disk = ReplicaLayout(site.storage, vmid).image("disk0")
            with b_disk.open("r+b") as f:
                f.seek(11 * BLOCK)
                f.write(rng.randbytes(BLOCK))
            written = b_disk.read_bytes()
            refused = await _frctl(
                "failover", "planned", "--config", str(site.write_primary_config()), "web01"
            )
            assert refused.returncode == 1
            assert "refused" in refused.stderr
            assert "the VM stays halted" in refused.stderr
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    # Nothing changed at the recovery side.
    assert b_disk.read_bytes() == written
    b_state = _replica_state(site, vmid)
    assert (b_state["failed_over"], b_state["generation"], b_state["applied_sequence"]) == (
        True,
        2,
        1,
    )
    # The primary is not in doubt any more, and still replicates nothing: a person looks.
    state = replicator.store.load(str(vmid))
    assert state.failover_in_doubt is None
    assert state.halted is not None
    assert "refused" in state.halted
    row = await _status_row(site)
    assert row["state"] == "halted"
    assert row["health"] == "critical"


async def test_a_request_that_never_arrived_is_refused_for_good_when_the_replica_differs(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection broke before the request reached the server: it is not failed over,
    and the request asked again is an ordinary one there. Its replica differs (a bit rot):
    OUT_OF_SEQUENCE, a definite refusal, which ends the doubt; replication goes on."""
    rng = random.Random(2013)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(2 * MIB))
    server = site.start_server()
    try:
        replicator = site.replicator(vmid, "db01", [image], server.port)
        await replicator.cycle()  # the IR

        async def broken(self: RecoveryClient, request: fp.FailoverRequest) -> fp.FailoverDone:
            raise OSError("the connection broke before the request went out")

        monkeypatch.setattr(RecoveryClient, "fail_over", broken)
        with pytest.raises(FailoverInDoubt):
            await planned_failover(replicator)
        monkeypatch.undo()
        assert replicator.store.load(str(vmid)).failover_in_doubt is not None
        assert _replica_state(site, vmid).get("failed_over") is not True
        with site.replica_image(vmid, 0).open("r+b") as f:
            f.seek(3 * BLOCK)
            f.write(b"\xff" * 16)
        refused = await _frctl(
            "failover", "planned", "--config", str(site.write_primary_config()), "db01"
        )
        assert refused.returncode == 1
        assert "differs" in refused.stderr
        assert "replication goes on" in refused.stderr
    finally:
        server.stop()
    state = replicator.store.load(str(vmid))
    assert state.failover_in_doubt is None
    assert state.halted is None
    b_state = _replica_state(site, vmid)
    assert not b_state.get("failed_over")
    assert b_state["generation"] == 1
    row = await _status_row(site)
    assert row["state"] == "replicating"


def test_resume_gives_up_a_failover_in_doubt_and_says_so(site: Site) -> None:
    """The operator's way out, by frctl: status shows the doubt, resume ends it (saying
    so) and status no longer shows it."""
    image = site.root / "disk0.img"
    image.write_bytes(b"\0" * MIB)
    vmid = uuid.UUID(int=2014, version=4)
    replicator = site.replicator(vmid, "app01", [image], 1)
    doubt = {"sequence": 3, "state_digest": "11" * 16, "generation": 1, "reverse_port": 0}

    def in_doubt(state: Any) -> None:
        state.failover_in_doubt, state.halted = dict(doubt), "failover in doubt: no answer"

    replicator.store.update(str(vmid), in_doubt)
    config = str(site.write_primary_config())
    status = frctl("replication", "status", "--config", config)
    assert "failover in doubt" in status.stdout
    resumed = frctl("replication", "resume", "--config", config, "app01")
    assert resumed.returncode == 0, resumed.stderr
    assert "planned failover in doubt is given up" in resumed.stderr
    assert replicator.store.load(str(vmid)).failover_in_doubt is None
    row = json.loads(frctl("replication", "status", "--config", config, "--json").stdout)["vms"][0]
    assert row["state"] != "failover in doubt"
    assert "failover-in-doubt" not in [r["code"] for r in row["reasons"]]


async def test_the_rerun_finishes_a_failover_with_reverse_replication(
    site: Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With this host as the VM's recovery side afterwards (``--server-config``): the
    takeover sets up the reverse replication toward this host before it answers (FOV-9),
    which does not stop the repeat; the replica made of this host's disks is kept while in
    doubt and takes the failover's generation when the re-run is answered."""
    rng = random.Random(2015)
    vmid = uuid.UUID(bytes=rng.randbytes(16), version=4)
    image = site.root / "disk0.img"
    image.write_bytes(rng.randbytes(2 * MIB))
    site.server_config.write_text(site.server_config.read_text() + "\n[reverse]\nfrequency = 1\n")
    server = site.start_server()
    a_config = a_server_config(site, tmp_path)
    a_server = start_server_process(a_config, tmp_path)
    proxy = FaultProxy(PROXY_HOST, SERVER_HOST, server.port, _NoFault())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            replicator = site.replicator(vmid, "web02", [image], proxy.port, host=PROXY_HOST)
            await replicator.cycle()  # the IR
            final = image.read_bytes()
            _lose_the_answer(monkeypatch, proxy)
            authorization = load_recovery_server_config(a_config).authorization
            with pytest.raises(FailoverInDoubt):
                await planned_failover(
                    replicator, authorization=authorization, reverse_port=a_server.port
                )
            # The recovery side took it over and set up the way back (to the address it
            # saw, the proxy's, where nothing listens: the reverse cycles fail; no matter).
            assert _replica_state(site, vmid)["generation"] == 2
            assert (site.storage / str(vmid) / "failover" / "reversed").exists()
            a_replica = tmp_path / "a-replicas" / str(vmid)
            assert a_replica.is_dir()  # kept while in doubt
            done = await _frctl(
                "failover", "planned", "--config", str(site.write_primary_config()), "web02",
                "--server-config", str(a_config), "--reverse-port", str(a_server.port), "--json",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert (result["generation"], result["asked_again"]) == (2, True)
            assert result["reverse"]["generation"] == 2
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
        a_server.stop()
    assert json.loads((a_replica / "state.json").read_text())["generation"] == 2
    assert ReplicaLayout(tmp_path / "a-replicas", vmid).image("disk0").read_bytes() == final
    assert ReplicaLayout(site.storage, vmid).image("disk0").read_bytes() == final

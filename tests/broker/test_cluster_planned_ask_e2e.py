"""``frctl cluster failover --planned VMID``: a planned failover asked at the cluster and
carried by the VM's node to its primary (FailoverAsk, protocol 1.1), with real node
processes and a real cluster store.

The primary declines when it has no stop hook, or its stop hook fails: the record says
``failed`` with its reason, and replication carries on. A 1.0 primary is never asked: the
ask stays pending until ``--wait`` withdraws it. A primary with a stop hook hands the VM
over: it runs at the node at generation 2, equal to the final disk, while another VM on
the same node keeps replicating.
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

from broker import admin
from broker.store import open_store
from frctl.main import main as frctl
from frtesting.cluster import ClusterSite, primary_replicator, replica_path
from node.failover.asked import AskedFailover
from node.primary.client import RecoveryClient
from tests.broker.test_migration_e2e import cycle_until_done, index, make_image, owner, scribble


def _where(site: ClusterSite) -> list[str]:
    return ["--store", site.store_url, "--prefix", site.prefix]


async def _replicating(vm: Any) -> None:
    """The primary's service, as far as a test needs it: a cycle every 0.2 s."""
    while True:
        await cycle_until_done(vm)
        await trio.sleep(0.2)


async def _while(primary: Callable[[], Awaitable[None]], args: list[str]) -> int:
    """Run ``frctl args`` (in a thread: it runs its own event loop) while ``primary``
    replicates; its exit status."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(primary)
        status = await trio.to_thread.run_sync(frctl, args)
        nursery.cancel_scope.cancel()
    assert isinstance(status, int)
    return status


def _vm_line(capsys: pytest.CaptureFixture[str], site: ClusterSite, vmid: uuid.UUID) -> str:
    assert frctl(["cluster", "vms", *_where(site)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    return lines[str(vmid)]


def _started(tmp_path: Path, seed: int) -> tuple[ClusterSite, random.Random]:
    site = ClusterSite(tmp_path, nodes=1)
    site.start_all()
    site.authorize_primary()
    return site, random.Random(seed)


def _declined_then_replicating(
    site: ClusterSite, rng: random.Random, vm: Any, vmid: uuid.UUID, image: Path
) -> str:
    """Ask, see it declined; then the VM still replicates. The failover note."""
    status = trio.run(
        _while,
        lambda: _replicating(vm),
        ["cluster", "failover", "--planned", str(vmid), *_where(site), "--wait", "60"],
    )
    assert status == 1
    record = owner(site, vmid)
    assert record.failover == "planned-declined"
    assert vm.state.halted is None
    # Replication carries on, to the same replica, at the same generation.
    scribble(image, rng)
    trio.run(cycle_until_done, vm)
    node = owner(site, vmid).owner
    assert replica_path(site, index(node), vmid).read_bytes() == image.read_bytes()
    assert vm.state.generation == 1
    return record.failover_note


def test_a_primary_without_a_stop_hook_declines_and_goes_on_replicating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site, rng = _started(tmp_path, 61)
    try:
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        trio.run(cycle_until_done, vm)
        note = _declined_then_replicating(site, rng, vm, vmid, image)
        assert "declined by its primary" in note
        assert "no stop hook" in note
        assert "not done: declined" in capsys.readouterr().err
        line = _vm_line(capsys, site, vmid)
        assert "planned failover declined" in line
    finally:
        site.stop_all()


def test_a_failing_stop_hook_is_a_decline(tmp_path: Path) -> None:
    site, rng = _started(tmp_path, 62)
    try:
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        vm.failover_ask = AskedFailover("echo cannot stop it >&2; exit 3")
        trio.run(cycle_until_done, vm)
        note = _declined_then_replicating(site, rng, vm, vmid, image)
        assert "stop hook" in note
        assert "exited 3" in note
        assert "cannot stop it" in note
        # Asked again, it is asked again (a new ask), and declined again.
        assert owner(site, vmid).failover == "planned-declined"
        _declined_then_replicating(site, rng, vm, vmid, image)
    finally:
        site.stop_all()


def test_a_1_0_primary_is_never_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    site, rng = _started(tmp_path, 63)
    try:
        vmid = uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        connect = RecoveryClient.connect.__func__  # type: ignore[attr-defined]

        async def at_1_0(cls: type[RecoveryClient], *args: Any, **kwargs: Any) -> Any:
            kwargs["version"] = (1, 0)
            client = await connect(cls, *args, **kwargs)
            assert client.negotiated.version == (1, 0)
            return client

        monkeypatch.setattr(RecoveryClient, "connect", classmethod(at_1_0))
        trio.run(cycle_until_done, vm)

        async def ask() -> None:
            async with open_store(site.store_url) as store:
                await admin.request_planned_failover(store, site.keys, vmid, by="test")

        trio.run(ask)
        assert "planned failover requested" in _vm_line(capsys, site, vmid)
        for _ in range(3):  # its connections are not asked: nothing declines it
            scribble(image, rng)
            trio.run(cycle_until_done, vm)
        assert owner(site, vmid).failover == "planned-requested"
        node = owner(site, vmid).owner
        assert replica_path(site, index(node), vmid).read_bytes() == image.read_bytes()
        # Pending already: asking again is refused.
        args = ["cluster", "failover", "--planned", str(vmid), *_where(site), "--wait", "2"]
        assert frctl(args) != 0
        assert "pending" in capsys.readouterr().err

        async def withdraw() -> None:
            async with open_store(site.store_url) as store:
                await admin.withdraw_planned_failover(store, site.keys, vmid, note="by hand")

        trio.run(withdraw)
        assert owner(site, vmid).failover_note == "by hand"
        # Asked with frctl, not answered within --wait: withdrawn, exit 1.
        status = trio.run(_while, lambda: _replicating(vm), args)
        assert status == 1
        assert "not answered within 2 s" in capsys.readouterr().err
        record = owner(site, vmid)
        assert record.failover == "planned-declined"
        assert "not answered within 2 s" in record.failover_note
        assert vm.state.halted is None
    finally:
        site.stop_all()


def test_planned_failover_asked_at_the_cluster_is_done_while_another_vm_replicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site, rng = _started(tmp_path, 64)
    try:
        vmid, other = uuid.uuid4(), uuid.uuid4()
        image = make_image(site.root / "disk0.img", rng)
        other_image = make_image(site.root / "other.img", rng)
        vm: Any = primary_replicator(site, vmid, [image])
        second: Any = primary_replicator(site, other, [other_image])
        stopped = site.root / "stopped"
        vm.failover_ask = AskedFailover(f'echo "$FRREP_VMID" >> {stopped}')
        trio.run(cycle_until_done, vm)
        trio.run(cycle_until_done, second)
        scribble(image, rng)  # the VM's last writes before it stops
        cycles = 0

        async def primaries() -> None:
            nonlocal cycles
            async with trio.open_nursery() as nursery:

                async def keep_replicating() -> None:
                    nonlocal cycles
                    while True:
                        scribble(other_image, rng)
                        await cycle_until_done(second)
                        cycles += 1

                nursery.start_soon(keep_replicating)
                await vm.run()  # the service's loop: it ends once the VM is handed over
                while cycles < 2:  # the other VM's cycles go on after the takeover too
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

        args = ["cluster", "failover", "--planned", str(vmid), *_where(site), "--json"]
        status = trio.run(_while, primaries, [*args, "--wait", "60"])
        out = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert status == 0, out
        assert out["failover"] == "done"
        assert out["generation"] == 2
        assert out["planned"] is True
        # The stop hook ran once, for this VM; the primary replicates it no more.
        assert stopped.read_text().split() == [str(vmid)]
        assert vm.state.failed_over_generation == 2
        assert vm.state.halted is not None
        node = owner(site, vmid).owner
        assert replica_path(site, index(node), vmid).read_bytes() == image.read_bytes()
        trio.run(cycle_until_done, second)
        assert replica_path(site, index(node), other).read_bytes() == other_image.read_bytes()
        record = owner(site, vmid)
        assert record.failover == "done"
        assert record.failover_generation == 2
        assert record.failover_point == out["sequence"] == vm.state.sequence
        assert "asked at the cluster" in record.failover_note
        assert "failover done (generation 2)" in _vm_line(capsys, site, vmid)
        assert "failover" not in _vm_line(capsys, site, other)
        # Failed over: a planned failover cannot be asked again.
        assert frctl([*args[:-1], "--wait", "2"]) != 0
        assert "failed over already" in capsys.readouterr().err
    finally:
        site.stop_all()

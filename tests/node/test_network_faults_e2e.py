"""Network faults between a real primary and a real recovery server (issue 19, item 6).

A `frctl primary run` process replicates one VM whose disk keeps changing to a
`frctl server run` process through :class:`frtesting.fault_proxy.FaultProxy` on
127.0.0.4, which cuts connections mid-batch, stalls them, truncates the server's answer,
slows them to a trickle and resets them. Then the writes stop and the faults with them,
and:

* the primary converges (``frctl replication wait``: in sync, health normal);
* no acknowledged batch is lost: while the faults go on, every batch the primary was told
  is durable is applied on the server or journaled there; at the end every sequence from
  the first batch to the primary's last acknowledged one was applied, and the replica is
  at that sequence;
* no batch is applied twice: the server logs one ``batch N of VM applied`` line per
  apply (:class:`node.recovery_session.BatchTiming`), each sequence once, and never
  refused a resent batch for other content;
* the replica equals the primary's disk, block for block.

A second test stalls a connection for good at the server's answer: the primary gives it
up (it used to wait for the Ack forever) and the next connection carries on.

``FRREP_NET_FAULTS`` sets how many faults of each kind (default 2: the CI slice; the long
run is ``FRREP_NET_FAULTS=50``), ``FRREP_SEED`` the seed. The counts are printed as one
JSON line (``pytest -s`` shows it).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import random
import re
import time
import uuid
from pathlib import Path

import pytest
import trio

import frproto as fp
from frtesting.fault_proxy import FIRST_FAULT_BYTE, Fault, FaultKind, FaultProxy, FaultSchedule
from node.primary import client as client_module
from node.primary.errors import UNREACHABLE
from node.primary.locks import FileLock, cycle_lock
from node.primary.state import PrimaryStateStore
from node.storage.layout import JOURNAL_SUFFIX, ReplicaLayout, parse_seq_name
from node.storage.state import state_document

from .site import SERVER_HOST, Site
from .test_operator_safety_e2e import MIB, Operator, disk, new_vm

#: The proxy's address: another loopback "host" between the primary and the server.
PROXY_HOST = "127.0.0.4"
FAULTS = int(os.environ.get("FRREP_NET_FAULTS", "2"))
SEED = int(os.environ.get("FRREP_SEED", "19"))
BLOCK = 65536


def _write_blocks(lock: FileLock, image: Path, rng: random.Random, count: int) -> None:
    """Overwrite ``count`` random whole blocks of the image (what a guest would do), unless
    a cycle is under way: the disks must not change while a cycle captures (README, "What
    the library expects"), and the primary service has no capture hooks to ask for that,
    so the writes take the VM's cycle lock (``node/primary/locks.py``), as a pause does."""
    if not lock.try_acquire():
        return
    try:
        with image.open("r+b") as f:
            blocks = os.fstat(f.fileno()).st_size // BLOCK
            for _ in range(count):
                f.seek(rng.randrange(blocks) * BLOCK)
                f.write(rng.randbytes(BLOCK))
    finally:
        lock.release()


def _check_nothing_acked_is_lost(site: Site, vmid: str) -> int:
    """While the faults go on: every batch the primary was told is durable is, on the
    server: applied, or its journal is there to be applied. Read in this order (the
    acknowledged sequence, the journals, the applied sequence), a batch applied meanwhile
    shows in the applied sequence. Returns how many acknowledged batches were checked."""
    acked = PrimaryStateStore(site.state_dir).load(vmid).sequence
    layout = ReplicaLayout(site.storage, uuid.UUID(vmid))
    journals = {parse_seq_name(p.name, JOURNAL_SUFFIX) for p in layout.journal_dir.iterdir()}
    applied = state_document(layout.state.read_bytes())["applied_sequence"]
    missing = [n for n in range(applied + 1, acked + 1) if n not in journals]
    assert not missing, f"acknowledged {acked}, applied {applied}, no journal of {missing}"
    return acked


@pytest.mark.timeout(120 + 20 * FAULTS * len(FaultKind))
async def test_a_primary_converges_through_cuts_stalls_truncations_trickles_and_resets(
    site: Site,
) -> None:
    rng = random.Random(SEED)
    server = site.start_server()
    operator = Operator(site, server)
    schedule = FaultSchedule(SEED)
    proxy = FaultProxy(PROXY_HOST, SERVER_HOST, server.port, schedule, seed=SEED)
    vmid = new_vm(rng)
    image = disk(site.root / "disk0.img", 8 * MIB, rng)
    started = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            operator.server_address = f"{PROXY_HOST}:{port}"
            enabled = await trio.to_thread.run_sync(
                lambda: operator.enable(vmid, "net01", f"disk0={image}", frequency="0.2s")
            )
            assert enabled.returncode == 0, enabled.stderr
            operator.start_service()
            await trio.to_thread.run_sync(lambda: operator.in_sync(vmid, timeout=90))
            # The IR went through untouched; now the faults, while the disk changes (each
            # connection carries more than the span the fault points are drawn from).
            schedule.enabled = True
            lock = cycle_lock(site.state_dir, vmid)
            checked = 0
            with trio.fail_after(20 * FAULTS * len(FaultKind)):
                for tick in itertools.count():
                    if min(proxy.triggered[k] for k in FaultKind) >= FAULTS:
                        break
                    _write_blocks(lock, image, rng, 6)
                    if tick % 5 == 0:
                        checked = _check_nothing_acked_is_lost(site, vmid)
                    await trio.sleep(0.1)
            schedule.enabled = False
            await trio.to_thread.run_sync(lambda: operator.in_sync(vmid, timeout=120))
            nursery.cancel_scope.cancel()
    finally:
        operator.stop_services()
        server.stop()
    elapsed = time.monotonic() - started

    acked = PrimaryStateStore(site.state_dir).load(vmid).sequence
    replica = state_document(ReplicaLayout(site.storage, uuid.UUID(vmid)).state.read_bytes())
    text = server.log.read_text()
    applies = collections.Counter(
        int(n) for n in re.findall(rf"batch (\d+) of {vmid} applied: timings", text)
    )
    report = {
        **proxy.counts(),
        "seed": SEED,
        "acknowledged": acked,
        "applied": sum(applies.values()),
        "duplicate_applies": sum(n - 1 for n in applies.values() if n > 1),
        "acked_again": text.count("already applied: ack again"),
        "checked_while_faulty": checked,
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(report))
    assert all(proxy.triggered[k] >= FAULTS for k in FaultKind), report
    # Converged: in sync (waited above), at the last acknowledged batch, equal to the disk.
    assert replica["applied_sequence"] == acked > 0, (replica["applied_sequence"], report)
    assert site.replica_image(uuid.UUID(vmid), 0).read_bytes() == image.read_bytes()
    # Nothing acknowledged lost, nothing applied twice: each sequence once, every one.
    assert report["duplicate_applies"] == 0, applies
    first = min(applies)
    assert sorted(applies) == list(range(first, acked + 1)), applies
    assert first == replica["ir_sequence"] + 1, (first, replica["ir_sequence"])
    assert "with other content" not in text
    assert "Traceback" not in text, text[-4000:]


class _Armed:
    """No fault until :attr:`fault` is set; then that fault, once."""

    def __init__(self) -> None:
        self.fault: Fault | None = None

    def next_fault(self, triggered: collections.Counter[FaultKind]) -> Fault | None:
        fault, self.fault = self.fault, None
        return fault


@pytest.mark.parametrize(
    ("fault", "writes"),
    [
        # From the server's answer to the batch on: the Ack never comes through.
        (Fault(FaultKind.STALL, FIRST_FAULT_BYTE, math.inf, on_answer=True), 8),
        # Mid-batch, a batch larger than the sockets' buffers: the send blocks.
        (Fault(FaultKind.STALL, FIRST_FAULT_BYTE, math.inf), 200),
    ],
    ids=["awaiting-the-ack", "sending-the-batch"],
)
async def test_a_connection_gone_silent_is_given_up_and_the_next_one_carries_on(
    site: Site, monkeypatch: pytest.MonkeyPatch, fault: Fault, writes: int
) -> None:
    """A connection on which nothing moves any more (a NAT that forgot the flow, a
    middlebox that stalled) used to hold the primary forever, awaiting the Ack or sending
    the batch: it had no deadline of its own, and TCP gives up only after many minutes, or
    never if something on the way keeps acknowledging (here: the stalled proxy's kernel)."""
    monkeypatch.setattr(client_module, "ANSWER_TIMEOUT", 1.0, raising=False)
    rng = random.Random(SEED)
    # The server's end of the silent connection holds the VM (BUSY to the next) until its
    # session or frame deadline: short here.
    site.write_server_config(connections="session_timeout = 2\nframe_timeout = 2")
    server = site.start_server()
    schedule = _Armed()
    proxy = FaultProxy(PROXY_HOST, SERVER_HOST, server.port, schedule, seed=SEED)
    vmid = uuid.UUID(new_vm(rng))
    image = disk(site.root / "disk0.img", 8 * MIB, rng)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            replicator = site.replicator(vmid, "silent01", [image], port, host=PROXY_HOST)
            await replicator.cycle()  # the IR, untouched
            _write_blocks(cycle_lock(site.state_dir, str(vmid)), image, rng, writes)
            schedule.fault = fault  # for good
            with trio.move_on_after(30) as waited:
                with pytest.raises(UNREACHABLE):
                    await replicator.cycle()
            assert not waited.cancelled_caught, "the primary still waits on a silent connection"
            assert proxy.triggered[FaultKind.STALL] == 1
            # A new connection: BUSY while the server still holds the silent one, then
            # the batch again (acknowledged again, not applied twice).
            with trio.fail_after(30):
                while True:
                    try:
                        await replicator.cycle()
                        break
                    except fp.Busy:
                        await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    finally:
        server.stop()
    assert replicator.pending.cycles() == []
    assert site.replica_image(vmid, 0).read_bytes() == image.read_bytes()
    text = server.log.read_text()
    assert len(re.findall(rf"batch 1 of {vmid} applied: timings", text)) == 1

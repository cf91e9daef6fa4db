"""What status shows of a VM's replication, judged when it is read (pure logic, no I/O).

A state file says what the service last did; it cannot say that the service has died
since, or that an idle VM's silence is fine. So health is never taken from the file as
it was written: :func:`vm_status` judges it from the VM's persisted state, the service's
liveness (its heartbeat, ``node/primary/heartbeat.py``), whether the pending log is
marked overflowed, and ``now``. The reader that gathers those facts is
:func:`node.primary.operations.replication_status`; ``frctl replication status``,
``wait`` and the replicator itself (for the ``health`` it saves) all judge here, so there
is one answer.

Two layers, as Hyper-V, vSphere Replication and Zerto show them: the **state** (what
replication is doing: initial replication, replicating, paused, halted) and the
**health** (normal, warning, critical) with every **reason** for it, each a short phrase
an operator can act on::

    warning: lag 12m over 2x the 5m interval
    warning: server unreachable since 2026-12-05T08:51:54Z: OSError: connection refused
    critical: primary service not running (no heartbeat)
    critical: pending log over its bound (4294967296 bytes): the next cycle resynchronizes

**Lag** is measured from the later of the last acknowledged batch and the last cycle
that confirmed the replica current (a cycle that ended with nothing pending): an idle VM
in sync is not lagging. It is late when over twice the VM's own interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from .heartbeat import STALE_SECONDS, Heartbeat
from .state import FailureKind, Health, IRStage, VMReplicationState

#: A VM is late when its lag passes this many of its intervals.
LATE_INTERVALS: Final = 2


class Severity(StrEnum):
    """How bad a VM's replication is; ``--check`` exits by the worst one."""

    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0, 1, 2: normal, warning, critical (to take the worst of several)."""
        return _RANKS[self]


_RANKS: Final = {Severity.NORMAL: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class ReplicationState(StrEnum):
    """What a VM's replication is doing."""

    INITIAL_REPLICATION = "initial replication"
    REPLICATING = "replicating"
    PAUSED = "paused"
    HALTED = "halted"
    #: A planned failover handed the VM over: it runs at the recovery side now.
    FAILED_OVER = "failed over"
    #: A planned failover's request got no answer: the VM may run at the recovery side
    #: (``node/primary/failover_doubt.py``); not replicated until that is known.
    FAILOVER_IN_DOUBT = "failover in doubt"


class Why(StrEnum):
    """The stable code of a :class:`Reason` (for scripts; the text is for people)."""

    HALTED = "halted"
    FAILED_OVER = "failed-over"
    FAILOVER_IN_DOUBT = "failover-in-doubt"
    PAUSED = "paused"
    SERVICE_NOT_RUNNING = "service-not-running"
    PENDING_OVERFLOW = "pending-overflow"
    DISK_UNAVAILABLE = "disk-unavailable"
    UNREACHABLE = "unreachable"
    CYCLE_FAILED = "cycle-failed"
    LAG = "lag"


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason for a health that is not normal."""

    code: Why
    severity: Severity
    text: str

    def to_json(self) -> dict[str, str]:
        """``{"code", "health", "text"}``."""
        return {"code": self.code.value, "health": self.severity.value, "text": self.text}


@dataclass(frozen=True, slots=True)
class ServiceLiveness:
    """Whether the primary service runs, judged from its heartbeat.

    Attributes:
        running: it beats.
        detail: why it is judged not running ("no heartbeat", "process 41 is gone",
            "last heartbeat 40s ago"); empty when it runs.
        pid / host / beat_at: from its heartbeat, when there is one.
    """

    running: bool
    detail: str = ""
    pid: int | None = None
    host: str | None = None
    beat_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON object (times RFC 3339, UTC)."""
        return {
            "running": self.running,
            "detail": self.detail or None,
            "pid": self.pid,
            "host": self.host,
            "last_heartbeat_at": rfc3339(self.beat_at),
        }


#: The liveness a running service (or a command replicating in this process) has.
RUNNING_HERE: Final = ServiceLiveness(running=True)


def service_liveness(
    beat: Heartbeat | None, *, now: float, pid_alive: bool | None
) -> ServiceLiveness:
    """Judge the service from its heartbeat. ``pid_alive``: whether the heartbeat's
    process exists, when it was written on this host (None: another host, not known)."""
    if beat is None:
        return ServiceLiveness(running=False, detail="no heartbeat")
    detail = ""
    age = now - beat.beat_at
    if pid_alive is False:
        detail = f"its process {beat.pid} is gone; last heartbeat {rfc3339(beat.beat_at)}"
    elif age > max(STALE_SECONDS, 3 * beat.interval_s):
        detail = f"last heartbeat {duration(age)} ago, at {rfc3339(beat.beat_at)}"
    return ServiceLiveness(
        running=not detail, detail=detail, pid=beat.pid, host=beat.host, beat_at=beat.beat_at
    )


@dataclass(frozen=True, slots=True)
class Counters:
    """Measure-VMReplication's columns for one VM (or summed over several)."""

    cycles_ok: int = 0
    cycles_failed: int = 0
    batches: int = 0
    bytes: int = 0
    max_batch_bytes: int = 0
    since: float | None = None

    @property
    def cycles(self) -> int:
        """Cycles run, successful or not."""
        return self.cycles_ok + self.cycles_failed

    @property
    def average_batch_bytes(self) -> int:
        """The average size of an acknowledged batch (0 before the first)."""
        return self.bytes // self.batches if self.batches else 0

    @classmethod
    def of(cls, state: VMReplicationState) -> Counters:
        """The counters a VM's state keeps."""
        return cls(
            state.cycles_ok,
            state.cycles_failed,
            state.batches_sent,
            state.batch_bytes_sent,
            state.batch_bytes_max,
            state.stats_since,
        )

    @classmethod
    def total(cls, counters: Iterable[Counters]) -> Counters:
        """The sum (maxima for the largest batch, the earliest start)."""
        out = cls()
        for c in counters:
            starts = [t for t in (out.since, c.since) if t is not None]
            out = cls(
                out.cycles_ok + c.cycles_ok,
                out.cycles_failed + c.cycles_failed,
                out.batches + c.batches,
                out.bytes + c.bytes,
                max(out.max_batch_bytes, c.max_batch_bytes),
                min(starts) if starts else None,
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON object (sizes in bytes)."""
        return {
            "cycles": self.cycles,
            "successful_cycles": self.cycles_ok,
            "failed_cycles": self.cycles_failed,
            "batches": self.batches,
            "bytes": self.bytes,
            "average_batch_bytes": self.average_batch_bytes,
            "maximum_batch_bytes": self.max_batch_bytes,
            "since": rfc3339(self.since),
        }


@dataclass(frozen=True, slots=True)
class VMStatus:
    """One VM's replication as status shows it."""

    vmid: str
    name: str
    state: ReplicationState
    health: Severity
    reasons: tuple[Reason, ...]
    #: Seconds since the replica was last known current (None before the IR ends).
    lag_seconds: float | None
    frequency_s: float
    ir_percent: float
    sequence: int
    pending_bytes: int
    last_acknowledged_at: float | None
    last_synced_at: float | None
    next_cycle_at: float | None
    last_error: str | None
    unreachable_since: float | None
    halted: str | None
    counters: Counters
    #: The relationship's generation as the recovery side last said (0: not known yet).
    generation: int = 0
    #: ``forward`` (the VM's primary replicates it), or ``reverse`` (the VM failed over
    #: to this host, which replicates it back to its former primary).
    direction: str = "forward"
    #: The generation a planned failover handed the VM over at (None: not failed over).
    failed_over_generation: int | None = None

    @property
    def health_text(self) -> str:
        """``normal``, or the health and every reason: ``warning: lag 12m over 2x the 5m
        interval``."""
        if not self.reasons:
            return self.health.value
        return f"{self.health.value}: " + "; ".join(r.text for r in self.reasons)

    def to_json(self) -> dict[str, Any]:
        """JSON object: times RFC 3339 UTC, durations in seconds, sizes in bytes."""
        return {
            "vmid": self.vmid,
            "name": self.name,
            "state": self.state.value,
            "health": self.health.value,
            "health_text": self.health_text,
            "reasons": [r.to_json() for r in self.reasons],
            "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds, 1),
            "frequency_seconds": self.frequency_s,
            "ir_percent": self.ir_percent,
            "sequence": self.sequence,
            "pending_bytes": self.pending_bytes,
            "last_acknowledged_at": rfc3339(self.last_acknowledged_at),
            "last_synced_at": rfc3339(self.last_synced_at),
            "next_cycle_at": rfc3339(self.next_cycle_at),
            "last_error": self.last_error,
            "unreachable_since": rfc3339(self.unreachable_since),
            "halted": self.halted,
            "counters": self.counters.to_json(),
            "generation": self.generation,
            "direction": self.direction,
            "failover": None
            if self.failed_over_generation is None
            else {"generation": self.failed_over_generation},
        }


def ir_percent(state: VMReplicationState) -> float:
    """How much of the VM's initial replication is done, in percent."""
    if state.ir_state == IRStage.COMPLETE:
        return 100.0
    total = state.ir_bytes_total or sum(int(d["size"]) for d in state.disks)
    return round(100.0 * state.ir_bytes_done / total, 1) if total else 0.0


def lag_of(state: VMReplicationState, now: float) -> float | None:
    """Seconds since the replica was last known current: the later of the last
    acknowledged batch and the last cycle that confirmed it; None before the IR ends
    (or before either happened)."""
    if state.ir_state != IRStage.COMPLETE:
        return None
    known = [t for t in (state.last_replicated_at, state.last_synced_at) if t is not None]
    return max(0.0, now - max(known)) if known else None


def vm_status(
    state: VMReplicationState, *, now: float, service: ServiceLiveness, overflowed: bool
) -> VMStatus:
    """Judge one VM's replication.

    Args:
        state: the VM's persisted state.
        now: wall-clock time (``time.time()``).
        service: whether the primary service runs (:func:`service_liveness`).
        overflowed: whether the VM's pending log is marked overflowed.
    """
    reasons: list[Reason] = []
    lag = lag_of(state, now)
    if state.failed_over_generation:
        # Not a fault: the operator handed the VM over (planned failover).
        what = ReplicationState.FAILED_OVER
        reasons.append(
            Reason(
                Why.FAILED_OVER,
                Severity.NORMAL,
                f"failed over to its recovery side at generation {state.failed_over_generation}",
            )
        )
    elif state.failover_in_doubt is not None:
        # The worst there is: two sides could end up writing if the VM is started here.
        what = ReplicationState.FAILOVER_IN_DOUBT
        reasons.append(
            Reason(
                Why.FAILOVER_IN_DOUBT,
                Severity.CRITICAL,
                f"failover in doubt: the planned failover request (sequence "
                f"{state.failover_in_doubt['sequence']}) got no answer; the VM may run at the "
                "recovery side: run 'frctl failover planned' again",
            )
        )
    elif state.halted is not None:
        what = ReplicationState.HALTED
        reasons.append(Reason(Why.HALTED, Severity.CRITICAL, f"halted: {state.halted}"))
    elif state.paused:
        what = ReplicationState.PAUSED
        reasons.append(
            Reason(
                Why.PAUSED,
                Severity.WARNING,
                "paused by an administrator: not replicating (frctl replication resume)",
            )
        )
    else:
        what = (
            ReplicationState.REPLICATING
            if state.ir_state == IRStage.COMPLETE
            else ReplicationState.INITIAL_REPLICATION
        )
        if not service.running:
            why = f" ({service.detail})" if service.detail else ""
            reasons.append(
                Reason(
                    Why.SERVICE_NOT_RUNNING,
                    Severity.CRITICAL,
                    f"primary service not running{why}",
                )
            )
    if overflowed and state.halted is None:
        reasons.append(
            Reason(
                Why.PENDING_OVERFLOW,
                Severity.CRITICAL,
                f"pending log over its bound ({state.pending_bytes} bytes kept): the next "
                f"cycle resynchronizes",
            )
        )
    if state.halted is None and state.last_error is not None:
        reasons.append(_failure(state))
    late = LATE_INTERVALS * state.frequency_s
    if what is ReplicationState.REPLICATING and lag is not None and lag > late:
        reasons.append(
            Reason(
                Why.LAG,
                Severity.WARNING,
                f"lag {duration(lag)} over {LATE_INTERVALS}x the "
                f"{duration(state.frequency_s)} interval",
            )
        )
    reasons.sort(key=lambda r: -r.severity.rank)
    worst = reasons[0].severity if reasons else Severity.NORMAL
    return VMStatus(
        vmid=state.vmid,
        name=state.name,
        state=what,
        health=worst,
        reasons=tuple(reasons),
        lag_seconds=lag,
        frequency_s=state.frequency_s,
        ir_percent=ir_percent(state),
        sequence=state.sequence,
        pending_bytes=state.pending_bytes,
        last_acknowledged_at=state.last_replicated_at,
        last_synced_at=state.last_synced_at,
        next_cycle_at=state.next_cycle_at
        if what
        not in (
            ReplicationState.HALTED,
            ReplicationState.FAILED_OVER,
            ReplicationState.FAILOVER_IN_DOUBT,
        )
        else None,
        last_error=state.last_error,
        unreachable_since=state.unreachable_since,
        halted=state.halted,
        counters=Counters.of(state),
        generation=state.generation,
        direction="reverse" if state.reverse else "forward",
        failed_over_generation=state.failed_over_generation or None,
    )


def _failure(state: VMReplicationState) -> Reason:
    """The reason of the last cycle's failure (``state.last_error`` is set)."""
    error = state.last_error or ""
    if state.last_error_kind == FailureKind.DISK:
        return Reason(Why.DISK_UNAVAILABLE, Severity.CRITICAL, f"disk unavailable: {error}")
    if state.last_error_kind == FailureKind.UNREACHABLE:
        since = rfc3339(state.unreachable_since) or "the last cycle"
        return Reason(
            Why.UNREACHABLE, Severity.WARNING, f"server unreachable since {since}: {error}"
        )
    return Reason(Why.CYCLE_FAILED, Severity.WARNING, f"last cycle failed: {error}")


def saved_health(status: VMStatus) -> Health:
    """The :class:`Health` the replicator saves in the state file (older readers show
    it): the judged severity, or ``initial replication`` while that goes well."""
    if status.health is Severity.NORMAL and status.state is ReplicationState.INITIAL_REPLICATION:
        return Health.INITIAL_REPLICATION
    return Health(status.health.value)


# -- all VMs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Every VM of a primary, the service's liveness, and the roll-up."""

    at: float
    service: ServiceLiveness
    vms: tuple[VMStatus, ...]
    counters: Counters = field(default_factory=Counters)

    @property
    def health(self) -> Severity:
        """The worst health of any VM (normal with none)."""
        return max((v.health for v in self.vms), key=lambda s: s.rank, default=Severity.NORMAL)

    def count(self, severity: Severity) -> int:
        """How many VMs have ``severity``."""
        return sum(1 for v in self.vms if v.health is severity)

    @property
    def worst_lag(self) -> VMStatus | None:
        """The VM with the largest lag, if any has one."""
        lagging = [v for v in self.vms if v.lag_seconds is not None]
        return max(lagging, key=lambda v: v.lag_seconds or 0.0, default=None)

    @property
    def summary(self) -> str:
        """The roll-up line: ``primary service: running (pid 41) · VMs 3: 2 normal, 1
        warning, 0 critical · worst lag 4m12s (web01) · cycles 120 (2 failed), 40
        batches, 1.2 GB``."""
        if self.service.running:
            service = f"running (pid {self.service.pid})"
        else:
            service = f"NOT RUNNING ({self.service.detail})"
        parts = [
            f"primary service: {service}",
            f"VMs {len(self.vms)}: " + ", ".join(f"{self.count(s)} {s.value}" for s in Severity),
        ]
        worst = self.worst_lag
        if worst is not None and worst.lag_seconds is not None:
            parts.append(f"worst lag {duration(worst.lag_seconds)} ({worst.name})")
        c = self.counters
        parts.append(
            f"cycles {c.cycles} ({c.cycles_failed} failed), {c.batches} batches, {size(c.bytes)}"
        )
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """JSON object: ``at``, ``service``, ``summary`` and ``vms``."""
        return {
            "at": rfc3339(self.at),
            "health": self.health.value,
            "service": self.service.to_json(),
            "summary": {
                "vms": len(self.vms),
                **{s.value: self.count(s) for s in Severity},
                "worst_lag_seconds": None
                if (w := self.worst_lag) is None or w.lag_seconds is None
                else round(w.lag_seconds, 1),
                "worst_lag_vm": None if w is None else w.name,
                "counters": self.counters.to_json(),
            },
            "vms": [v.to_json() for v in self.vms],
        }


def report(
    states: Sequence[VMReplicationState],
    *,
    now: float,
    service: ServiceLiveness,
    overflowed: Iterable[str] = (),
) -> StatusReport:
    """Judge every VM (sorted by name). ``overflowed``: the VMIDs whose pending log is
    marked overflowed."""
    over = set(overflowed)
    vms = tuple(
        vm_status(s, now=now, service=service, overflowed=s.vmid in over)
        for s in sorted(states, key=lambda s: (s.name, s.vmid))
    )
    return StatusReport(now, service, vms, Counters.total(v.counters for v in vms))


# -- words -----------------------------------------------------------------------------


def rfc3339(t: float | None) -> str | None:
    """A wall-clock time as RFC 3339 in UTC, to the second (``2026-12-05T08:51:54Z``)."""
    if t is None:
        return None
    try:
        when = datetime.fromtimestamp(t, UTC)
    except (ValueError, OverflowError, OSError):
        return f"{t!r} (not a time)"  # a damaged file's value: shown, never a traceback
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    """``2.3s``, ``45s``, ``5m``, ``4m12s``, ``1h05m``, ``2d03h``."""
    if seconds < 10 and seconds != int(seconds):
        # Short intervals (tests, tight RPOs): "lag 2.3s over 2x the 1s interval", not "2s".
        return f"{seconds:.1f}s"
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m" if secs == 0 else f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def size(nbytes: int) -> str:
    """Bytes in SI units, as ``frctl`` prints rates (``1.2 GB``)."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")

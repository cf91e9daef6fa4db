"""The SQLite store's leases: deadlines on the host's monotonic clock, and their expiry.

A lease is a row of the ``lease`` table: its TTL and its deadline on ``time.monotonic()``
(CLOCK_MONOTONIC is host-wide on Linux and never jumps with NTP, unlike the wall clock). That
clock restarts at boot, so the boot id is kept in ``meta`` and every lease is dropped when it
changes (``sqlite_schema.py``); a deadline further away than its own TTL is also treated as
expired (a clock from another boot).

Expiry is lazy but prompt: every read and write first expires due leases (``sqlite_db.py``),
and every watch poll does too (``sqlite_watch.py``), so a watcher sees the DELETE events within
one poll interval of the deadline even when nobody else touches the store. Expiring or revoking
a lease deletes all its keys at one revision.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from .base import LeaseExpired
from .sqlite_tx import WriteTx

__all__ = ["any_due", "boot_id", "expire_due", "grant", "keepalive", "revoke", "revoke_all"]

# Past its deadline, or a deadline further away than its TTL (and one second more): a
# deadline on the monotonic clock of another boot.
_EXPIRED: Final = "expires <= ? OR expires > ? + ttl + 1.0"


def boot_id() -> str:
    """An id that changes at every boot (the monotonic clock restarts then)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        # Not Linux: no reliable boot id. The "deadline further away than its TTL" rule still
        # catches leases from before a reboot.
        return ""


def any_due(conn: sqlite3.Connection, now: float) -> bool:
    """Is some lease past its deadline (or from another boot)?"""
    return (
        conn.execute(f"SELECT 1 FROM lease WHERE {_EXPIRED} LIMIT 1", (now, now)).fetchone()
        is not None
    )


def expire_due(tx: WriteTx) -> None:
    """Revoke every lease past its deadline (or from another boot)."""
    for (lease_id,) in tx.conn.execute(
        f"SELECT id FROM lease WHERE {_EXPIRED}", (tx.now, tx.now)
    ).fetchall():
        revoke(tx, int(lease_id))


def revoke(tx: WriteTx, lease_id: int) -> bool:
    """Delete the lease and its keys (one revision, if it held any); False if it was gone."""
    keys = [
        bytes(r[0]).decode("utf-8")
        for r in tx.conn.execute(
            "SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,)
        ).fetchall()
    ]
    if keys:
        rev = tx.bump()
        for key in keys:
            tx.delete(key, rev)
    return tx.conn.execute("DELETE FROM lease WHERE id = ?", (lease_id,)).rowcount > 0


def revoke_all(tx: WriteTx) -> None:
    """Revoke every lease (the host rebooted: their holders are gone)."""
    for (lease_id,) in tx.conn.execute("SELECT id FROM lease").fetchall():
        revoke(tx, int(lease_id))


def grant(tx: WriteTx, ttl_s: float) -> int:
    """Create a lease due ``ttl_s`` seconds from now; returns its id."""
    row = tx.conn.execute(
        "INSERT INTO lease (ttl, expires) VALUES (?, ?) RETURNING id",
        (float(ttl_s), tx.now + ttl_s),
    ).fetchone()
    return int(row[0])


def keepalive(tx: WriteTx, lease_id: int) -> float:
    """Push the lease's deadline a full TTL from now; returns the TTL or raises `LeaseExpired`."""
    row = tx.conn.execute(
        "UPDATE lease SET expires = ? + ttl WHERE id = ? RETURNING ttl", (tx.now, lease_id)
    ).fetchone()
    if row is None:
        raise LeaseExpired(lease_id)
    return float(row[0])

"""The one time format of frctl's JSON output: RFC 3339 in UTC, to the second
(``2026-12-05T08:00:00Z``)."""

from __future__ import annotations

import datetime as dt


def rfc3339(moment: float | dt.datetime | None) -> str | None:
    """``moment`` (seconds since the epoch, or an aware datetime) as RFC 3339 UTC; None
    and the epoch itself (a time never set) stay None."""
    if moment is None:
        return None
    if isinstance(moment, dt.datetime):
        when = moment.astimezone(dt.UTC)
    else:
        if moment == 0:
            return None
        when = dt.datetime.fromtimestamp(moment, dt.UTC)
    return when.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")

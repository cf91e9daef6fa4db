"""How frctl's long-running commands log: one format, to stderr.

Two forms: ``text`` (``2026-12-05 08:00:00,123 INFO frrep.recovery: ...``, for a person
and for journald, which stamps lines itself) and ``json`` (one object per line, for a log
pipeline: ``{"time": "2026-12-05T08:00:00.123Z", "level": "INFO", "logger":
"frrep.recovery", "message": "...", "pid": 123}``, with ``"exception"`` when a traceback
was logged). Both are the standard library's logging: every module logs through it, and
a formatter is all a JSON form needs (structlog would mean a second logging API or its
bridge to this one).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final

#: The log forms ``--log-format`` takes.
LOG_FORMATS: Final = ("text", "json")


class JSONFormatter(logging.Formatter):
    """One JSON object per record, times in RFC 3339 UTC with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, form: str = "text") -> None:
    """Log at ``level`` (``debug``, ``info``, ``warning``) to stderr, in ``form``
    (:data:`LOG_FORMATS`)."""
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])

"""How frctl's long-running commands log: one format, to stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Log at ``level`` (``debug``, ``info``, ``warning``) to stderr, with timestamps."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

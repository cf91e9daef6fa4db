"""One progress line for frctl's long transfers (``ir export``, ``ir import``,
``replication resync``): percent, bytes, rate and time left, on stderr.

On a terminal the line is rewritten in place (``\\r``) at most ten times a second;
otherwise (a log, a pipe) a line is written every 10%, so a journal is not flooded.
Hand-written rather than a progress library: it is one line, it must write plain lines
when stderr is not a terminal, and it adds no dependency to a command every install has.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

MIB = 1024 * 1024


def _rate(bytes_per_s: float) -> str:
    """``183 MB/s``: decimal units, as bandwidth limits are given (``200M``)."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.3g} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _duration(seconds: float) -> str:
    """``1:05:09``, ``4:07``, ``0:03``."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLine:
    """``progress(done, total)`` printed to ``stream`` without flooding it, with the rate
    since the first call and the time left at that rate."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._clock = clock
        self._start: tuple[float, int] | None = None
        self._last_step = -1
        self._last_time = 0.0
        self._shown = False

    def line(self, done: int, total: int) -> str:
        """The text shown for ``done`` of ``total`` bytes now."""
        now = self._clock()
        if self._start is None:
            self._start = (now, done)  # a resumed transfer's rate counts from here
        percent = 100 if total == 0 else done * 100 // total
        text = f"{self.label}: {percent:3d}% ({done // MIB} of {total // MIB} MiB"
        elapsed = now - self._start[0]
        moved = done - self._start[1]
        if elapsed > 0 and moved > 0:
            rate = moved / elapsed
            text += f", {_rate(rate)}"
            if done < total:
                text += f", {_duration((total - done) / rate)} left"
            else:
                text += f", {_duration(elapsed)}"
        return text + ")"

    def __call__(self, done: int, total: int) -> None:
        line = self.line(done, total)
        percent = 100 if total == 0 else done * 100 // total
        now = self._clock()
        if self.tty:
            if percent != self._last_step and (now - self._last_time >= 0.1 or done == total):
                # Padded: a shorter line must not leave the end of the longer one behind.
                self.stream.write(f"\r{line:<79}")
                self.stream.flush()
                self._last_step, self._last_time, self._shown = percent, now, True
            return
        step = percent // 10
        if step != self._last_step:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_step = step

    def finish(self) -> None:
        """End the rewritten line on a terminal."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()

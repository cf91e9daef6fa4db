"""frctl: the one command-line entry point of the project (a thin shell over the libraries)."""

import signal
import sys
from types import FrameType
from typing import NoReturn

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


def run() -> NoReturn:
    """The ``frctl`` command (and ``python -m frctl``): :func:`frctl.main.main`.

    A Ctrl-C while Python still imports the command's modules (a second or so) is held
    until they are imported, then ends the command quietly with exit status 130: a
    KeyboardInterrupt raised inside an import can come out as a traceback, or even as
    another exception (an interrupted ``from _ssl import RAND_egd`` gives a TypeError)."""
    interrupted = False

    def note(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        from frctl.main import main
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        sys.exit(INTERRUPTED)
    try:
        code = main()
    except KeyboardInterrupt:
        code = INTERRUPTED
    sys.exit(code)

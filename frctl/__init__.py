"""frctl: the one command-line entry point of the project (a thin shell over the libraries)."""

import sys
from typing import NoReturn

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


def run() -> NoReturn:
    """The ``frctl`` command (and ``python -m frctl``): :func:`frctl.main.main`, imported
    here so that a Ctrl-C that comes while Python still imports the command's modules
    (a second or so) also ends quietly with exit status 130, not a traceback."""
    try:
        from frctl.main import main

        code = main()
    except KeyboardInterrupt:
        code = INTERRUPTED
    sys.exit(code)

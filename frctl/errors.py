"""frctl's one error handler: an expected failure becomes ``frctl: <message>`` on stderr
and a documented exit code, never a Python traceback.

Exit codes (the README's "Command line" table): 0 ok, 1 failure, 2 usage error,
3 not in sync or unhealthy, 4 not found, 130 interrupted.

The expected failures are named by their class's dotted name, not imported: telling a
``StoreError`` apart must not import the cluster store (and its dependencies) into every
``frctl`` run, and a room a command never loaded cannot have raised its errors.
"""

from __future__ import annotations

import sys
import traceback
from typing import TextIO

from frctl import INTERRUPTED as _INTERRUPTED

OK = 0
FAILURE = 1
USAGE = 2
NOT_IN_SYNC = 3
NOT_FOUND = 4
INTERRUPTED = _INTERRUPTED  # Ctrl-C: frctl/__init__.py, which also catches it during imports

#: Expected failures: class (dotted name, subclasses included) -> (exit code, prefix of
#: the message). The first match along the exception's MRO wins, so a subclass listed
#: before its base keeps its own code.
EXPECTED: dict[str, tuple[int, str]] = {
    # Not found: a VM that is not enabled here, a replica or cluster VM that is not there.
    "node.primary.operations.NotEnabled": (NOT_FOUND, ""),
    "broker.admin.NoSuchVM": (NOT_FOUND, ""),
    "frproto._errors.UnknownVM": (NOT_FOUND, ""),
    # The configuration and the host's own files.
    "frlink.config.ConfigError": (FAILURE, ""),
    "frlink.tls.ConnectFailure": (FAILURE, "cannot connect: "),
    "frlink.tls.TLSFailure": (FAILURE, ""),
    "frlink.tls.TLSConfigError": (FAILURE, "TLS files: "),
    "frlink.certs.CertError": (FAILURE, ""),
    # What the far side, the protocol or the cluster store said.
    "frproto._errors.FrprotoError": (FAILURE, ""),
    "broker.store.base.StoreError": (FAILURE, "cluster store: "),
    "broker.admin.AdminError": (FAILURE, ""),
    "broker.records.RecordError": (FAILURE, "cluster store record: "),
    # The primary's state and its operations.
    "node.primary.operations.Refused": (FAILURE, ""),
    "node.primary.operations.CycleStillRuns": (NOT_IN_SYNC, ""),
    "node.primary.state.StateCorrupt": (FAILURE, "the VM's state file: "),
    "node.primary.locks.ServiceAlreadyRunning": (FAILURE, ""),
    "node.primary.locks.LockBusy": (FAILURE, ""),
    "node.primary.disks.DiskProblem": (FAILURE, ""),
    "node.primary.errors.ReplicationHalted": (FAILURE, "halted: "),
    "node.primary.pending_log.PendingLogError": (FAILURE, "pending log: "),
    # The recovery side's files.
    "node.oob_file.OOBError": (FAILURE, ""),
    "node.storage.lock.StorageBusy": (FAILURE, ""),
    "node.failover.test.HookFailed": (FAILURE, "hook: "),
    "trio.TooSlowError": (FAILURE, "timed out"),
    "trio.BrokenResourceError": (FAILURE, "the connection broke: "),
    "OSError": (FAILURE, ""),
    "UnicodeDecodeError": (FAILURE, "not text: "),
}


def _dotted(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one member each, as
    ``trio.run`` raises them; a group of several stays a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _os_message(exc: OSError) -> str:
    # "[Errno 2] No such file or directory: 'x'" reads like a traceback's last line.
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        return f"{exc.filename}: {what}"
    return what


def classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) of an expected failure; None for an unexpected one."""
    exc = _leaf(exc)
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    for cls in type(exc).__mro__:
        found = EXPECTED.get(_dotted(cls))
        if found is None:
            continue
        code, prefix = found
        if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
            text = _os_message(exc)
        else:
            text = str(exc)
        if not text:
            return code, prefix.rstrip(": ") or type(exc).__name__
        return code, f"{prefix}{text}"
    return None


def report(exc: BaseException, *, debug: bool, stream: TextIO | None = None) -> int:
    """Say what went wrong on ``stream`` (stderr) and return the exit code.

    An unexpected exception gets one line and the hint to rerun with ``--debug``; with
    ``debug`` the traceback is printed as well."""
    out = stream if stream is not None else sys.stderr
    if debug:
        traceback.print_exception(exc, file=out)
    found = classify(exc)
    if found is not None:
        code, message = found
        if code != INTERRUPTED:
            print(f"frctl: {message}", file=out)
        return code
    leaf = _leaf(exc)
    print(f"frctl: unexpected error: {type(leaf).__name__}: {leaf}", file=out)
    if not debug:
        print("frctl: this is a bug; rerun with --debug for the traceback", file=out)
    return FAILURE

"""The plan's hook commands: run through the shell with the plan's environment, within
what is left of the step's timeout.

Every hook gets ``FRREP_PLAN``, ``FRREP_GROUP``, ``FRREP_MODE`` (test, planned,
unplanned) and ``FRREP_VMIDS`` (the group's VMIDs, space-separated); a VM's hook (start,
stop) also ``FRREP_VMID``, ``FRREP_VM_DIR``, ``FRREP_SEQUENCE``, ``FRREP_CONFIG`` and
``FRREP_DISKS`` (colon-separated), as the failover commands' hooks
(``node/failover/test.py``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from node.storage.point_copy import PointCopy


class StepFailed(Exception):
    """A step of the plan failed: a hook exited non-zero or ran out of time, or a
    failover was refused."""


def vm_env(copy: PointCopy) -> dict[str, str]:
    """A VM's part of a hook's environment."""
    return {
        "FRREP_VM_DIR": str(copy.directory),
        "FRREP_VMID": str(copy.vmid),
        "FRREP_SEQUENCE": str(copy.sequence),
        "FRREP_CONFIG": str(copy.config),
        "FRREP_DISKS": ":".join(str(p) for p in copy.disks),
    }


def run_hook(what: str, command: str, env: Mapping[str, str], *, timeout: float, cwd: Path) -> None:
    """Run ``command`` (``what`` names it in errors) in ``cwd``.

    Raises:
        StepFailed: it exited non-zero, or was still running after ``timeout`` seconds
            (then it is killed).
    """
    if timeout <= 0:
        raise StepFailed(f"{what}: the step's timeout ran out before it could start")
    # A session of its own: on a timeout the hook's whole process group is killed, not
    # only the shell (a script's children would run on after the plan stopped).
    proc = subprocess.Popen(
        command,
        shell=True,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise StepFailed(
            f"{what} {command!r} ran past the step's timeout (it had {timeout:.1f} s left): killed"
        ) from None
    if proc.returncode:
        said = err.decode(errors="replace").strip()[-400:]
        raise StepFailed(
            f"{what} {command!r} exited {proc.returncode}" + (f": {said}" if said else "")
        )


def hook_found(command: str, cwd: Path) -> str | None:
    """Why ``command``'s program cannot be found (None: it can): its first word is a
    shell builtin, a program on ``PATH``, or a file relative to ``cwd``."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return f"{command!r}: {exc}"
    if not words:
        return "an empty command"
    program = words[0]
    if program in _BUILTINS or shutil.which(program) is not None:
        return None
    path = Path(program) if os.path.isabs(program) else cwd / program
    if "/" in program and path.is_file() and os.access(path, os.X_OK):
        return None
    return f"{program!r} is not a program on PATH nor an executable file"


_BUILTINS = frozenset(
    ["true", "false", "echo", "test", "[", "exit", "printf", ":", "cd", "sleep", "exec"]
)

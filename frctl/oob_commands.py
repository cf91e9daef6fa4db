"""frctl subcommands of the out-of-band initial replication: ``frctl ir export|import``
(``node/primary/oob_export.py``, ``node/oob_import.py``, ``docs/oob-ir.md``).

Progress goes to stderr (one line rewritten with ``\\r`` on a terminal, a line every 10%
otherwise); the result is one line on stdout, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .progress import ProgressLine


def _fail(message: object) -> int:
    if isinstance(message, OSError) and message.filename is not None:
        message = f"{message.filename}: {message.strerror or message}"
    print(f"frctl: {message}", file=sys.stderr)
    return 1


def _cmd_export(args: argparse.Namespace) -> int:
    from node.primary.config import ConfigError, load_primary_config
    from node.primary.locks import LockBusy, cycle_lock, holding
    from node.primary.operations import NotEnabled, find_vm
    from node.primary.state import PrimaryStateStore

    try:
        config = load_primary_config(Path(args.config))
    except ConfigError as exc:
        return _fail(exc)
    store = PrimaryStateStore(config.state_dir)
    try:
        vmid = find_vm(store, args.vmid).vmid
    except NotEnabled as exc:
        print(f"frctl: {exc} (frctl replication enable first)", file=sys.stderr)
        return 4
    try:
        # No cycle of the VM (an online IR) may run while its disks are exported.
        with holding(cycle_lock(store.root, vmid), timeout=60):
            return _export(args, store, vmid, config.state_dir)
    except LockBusy:
        return _fail(f"a replication cycle of VM {vmid} still runs after 60 s: pause it first")


def _export(args: argparse.Namespace, store: Any, vmid: str, state_dir: Path) -> int:
    import frproto as fp
    from node.oob_file import OOBError
    from node.primary.disks import DiskUnavailable
    from node.primary.oob_export import export_ir
    from node.primary.state import StateCorrupt

    try:
        state = store.load(vmid)
    except FileNotFoundError:
        return _fail(
            f"VM {vmid} is not enabled for replication on this primary "
            "(frctl replication enable first)"
        )
    except StateCorrupt as exc:
        return _fail(exc)
    blob = b""
    if args.vm_config is not None:
        try:
            blob = Path(args.vm_config).read_bytes()
        except OSError as exc:
            return _fail(f"--vm-config: {exc}")
    progress = ProgressLine(f"exporting {state.name}")
    try:
        if state.qemu is not None:  # read through QEMU, the guest running (docs/qemu.md)
            from node.primary.qemu.oob import export_ir_from_qemu

            result = export_ir_from_qemu(
                state, state_dir, Path(args.out), config=blob, progress=progress
            )
        else:
            result = export_ir(state, state_dir, Path(args.out), config=blob, progress=progress)
    except (OOBError, OSError, fp.FrprotoError, DiskUnavailable) as exc:
        progress.finish()
        return _fail(exc)
    progress.finish()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"exported {result.name} ({result.vmid}) to {result.path}: {result.disks} disks, "
            f"{result.total_bytes} bytes ({result.zero_bytes} zero), {result.chunk_count} "
            f"chunks, {result.file_bytes} bytes of file, aggregate {result.aggregate_digest}"
        )
    return 0


def _storage_locations(config: Any) -> list[Path]:
    auth = config.authorization
    locations = [e.storage for e in auth.entries]
    if auth.any_primary is not None:
        locations.append(auth.any_primary.storage)
    return list(dict.fromkeys(locations))


def _cmd_import(args: argparse.Namespace) -> int:
    import frproto as fp
    from node.config import ConfigError, load_recovery_server_config
    from node.oob_file import OOBError, read_header
    from node.oob_import import import_ir
    from node.storage import ReplicaStore

    path = Path(args.file)
    try:
        config = load_recovery_server_config(Path(args.config))
        header = read_header(path)
    except (ConfigError, OSError, OOBError, fp.FrprotoError) as exc:
        return _fail(exc)
    tried = []
    for storage in _storage_locations(config):
        tried.append(str(storage))
        if not storage.is_dir():
            continue
        with ReplicaStore(storage, keep_points=config.recovery_points) as store:
            if not store.exists(header.vmid):
                continue
            progress = ProgressLine(f"importing {header.name}")
            try:
                result = import_ir(store, path, progress=progress)
            except (OOBError, OSError, fp.FrprotoError) as exc:
                progress.finish()
                return _fail(f"{path}: {type(exc).__name__}: {exc}")
            progress.finish()
        if args.json:
            print(json.dumps(result.to_json()))
        else:
            print(
                f"imported {result.name} ({result.vmid}) into {result.storage}: "
                f"{result.total_bytes} bytes ({result.zero_bytes} zero), "
                f"{result.chunk_count} chunks, IR complete at sequence {result.sequence}"
            )
        return 0
    return _fail(
        f"no relationship for VM {header.vmid} ({header.name}) in any storage location of "
        f"{args.config} ({', '.join(tried) or 'none configured'}): let the primary connect "
        "once so it creates the relationship, then import"
    )


def register(sub: Any) -> None:
    """Add ``frctl ir`` to frctl's subparsers."""
    ir = sub.add_parser("ir", help="out-of-band initial replication (export / import a file)")
    isub = ir.add_subparsers(dest="ir_command", required=True, metavar="ACTION")

    export = isub.add_parser(
        "export",
        help="export an enabled VM's disks to a file (on the primary)",
        description="Export the disks of a VM enabled with 'frctl replication enable' "
        "to FILE. Pause its replication (or stop the primary service) first, and keep the "
        "images unchanged while this runs (a paused VM or a snapshot).",
    )
    export.add_argument("--config", required=True, help="primary TOML file")
    export.add_argument("vmid", help="the VM's VMID, or its name")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    export.add_argument("--vm-config", metavar="FILE", help="the VM's config blob to carry")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(func=_cmd_export)

    imp = isub.add_parser(
        "import",
        help="import an exported file into its relationship (on the recovery server)",
        description="Import FILE into the replica it belongs to, found in the storage "
        "locations of the server's authorization entries. The relationship must exist "
        "(the primary's first connection creates it). Run this while the recovery server "
        "is not serving the VM (stop it, import, start it again).",
    )
    imp.add_argument("--config", required=True, help="recovery server TOML file")
    imp.add_argument("file")
    imp.add_argument("--json", action="store_true", help="print the result as JSON")
    imp.set_defaults(func=_cmd_import)

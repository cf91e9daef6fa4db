"""``frctl conform``: the protocol conformance harness against any endpoint."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _vmid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VMID (a GUID)") from None


def _hosts(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, address = pair.partition("=")
        if not sep or not name or not address:
            raise SystemExit(f"frctl: --host wants NAME=ADDRESS, not {pair!r}")
        out[name.lower().rstrip(".")] = address
    return out


def _cmd_conform(args: argparse.Namespace) -> int:
    import trio

    from frconform.report import junit, table, to_json
    from frconform.runner import run
    from frconform.scenario import Options
    from frconform.wire import HarnessError, Target, client_context

    if args.list:
        return _list()
    if args.export_spec:
        from frconform.resources import export_spec

        written = export_spec(Path(args.export_spec))
        if args.json:
            print(json.dumps({"directory": args.export_spec, "files": [str(p) for p in written]}))
        else:
            print(f"{args.export_spec}: protocol.md and {len(written) - 1} vector files")
        return 0
    if args.endpoint is None or not (args.cert and args.key and args.ca):
        print("frctl: conform needs HOST:PORT, --cert, --key and --ca", file=sys.stderr)
        return 2
    host, port = args.endpoint
    try:
        context = client_context(Path(args.cert), Path(args.key), Path(args.ca))
    except (OSError, ValueError) as exc:
        print(f"frctl: conform: the harness's certificate: {exc}", file=sys.stderr)
        return 2
    try:
        no_sni = client_context(Path(args.cert), Path(args.key), Path(args.ca), check_name=False)
    except (OSError, ValueError) as exc:
        print(f"frctl: conform: the harness's certificate: {exc}", file=sys.stderr)
        return 2
    target = Target(
        host,
        port,
        args.name or host,
        context,
        _hosts(args.host),
        timeout=args.timeout,
        no_sni_context=no_sni,
    )
    unauthorized = None
    if bool(args.unauthorized_cert) != bool(args.unauthorized_key):
        print("frctl: conform: --unauthorized-cert needs --unauthorized-key", file=sys.stderr)
        return 2
    if args.unauthorized_cert:
        try:
            unauthorized = client_context(
                Path(args.unauthorized_cert), Path(args.unauthorized_key), Path(args.ca)
            )
        except (OSError, ValueError) as exc:
            print(f"frctl: conform: the unauthorized certificate: {exc}", file=sys.stderr)
            return 2
    other_group = None
    if bool(args.other_group_cert) != bool(args.other_group_key):
        print("frctl: conform: --other-group-cert needs --other-group-key", file=sys.stderr)
        return 2
    if args.other_group_cert:
        try:
            other_group = client_context(
                Path(args.other_group_cert), Path(args.other_group_key), Path(args.ca)
            )
        except (OSError, ValueError) as exc:
            print(f"frctl: conform: the other trust group's certificate: {exc}", file=sys.stderr)
            return 2
    options = Options(
        deleted_vmid=args.deleted_vmid,
        unauthorized_cert=unauthorized,
        other_group_cert=other_group,
        negotiate_timeout=args.negotiate_timeout,
        ready_timeout=args.ready_timeout,
        session_timeout=args.session_timeout,
        frame_timeout=args.frame_timeout,
        max_per_address=args.max_per_address,
    )
    only = [o.strip() for o in args.only.split(",")] if args.only else []
    try:
        report = trio.run(lambda: run(target, options, only=only))
    except HarnessError as exc:
        print(f"frctl: conform: {exc}", file=sys.stderr)
        return 2
    if args.junit:
        Path(args.junit).write_text(junit(report))
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(table(report, verbose=args.verbose))
    return 0 if report.ok else 1


def _list() -> int:
    import frconform.runner  # noqa: F401  (registers the scenarios)
    from frconform.requirements import load_requirements
    from frconform.scenario import SCENARIOS

    checked = {r for s in SCENARIOS for r in s.requirements}
    for req in load_requirements().values():
        mark = "checked" if req.id in checked else "-"
        print(f"{req.id:<8} {mark:<8} {req.text}")
    return 0


def register(sub: Any) -> None:
    """Add ``conform`` to frctl's subcommands."""
    conform = sub.add_parser(
        "conform",
        help="check a recovery endpoint (server, node or broker's CAP) against docs/protocol.md",
    )
    conform.add_argument("endpoint", nargs="?", type=_address, help="HOST:PORT")
    conform.add_argument("--name", help="the endpoint's TLS name (SNI; default: HOST)")
    conform.add_argument("--cert", help="the harness's certificate (a primary's)")
    conform.add_argument("--key", help="its private key")
    conform.add_argument("--ca", help="the CA that issued the endpoint's certificate")
    conform.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="an address for a name DNS does not resolve (a broker's nodes); repeatable",
    )
    conform.add_argument(
        "--deleted-vmid", type=_vmid, help="a VM deleted in the cluster (broker: DELETED)"
    )
    conform.add_argument(
        "--unauthorized-cert",
        metavar="FILE",
        help="a certificate of the endpoint's CA that it does not authorize (TLS-4)",
    )
    conform.add_argument("--unauthorized-key", metavar="FILE", help="its private key")
    conform.add_argument(
        "--other-group-cert",
        metavar="FILE",
        help="a certificate the endpoint authorizes in another trust group than --cert's, "
        "best with storage of its own (BRK-4, REP-9, REP-33)",
    )
    conform.add_argument("--other-group-key", metavar="FILE", help="its private key")
    deadlines = (
        ("--negotiate-timeout", "the endpoint's negotiation deadline (TIM-1, TIM-2)"),
        ("--ready-timeout", "the endpoint's idle deadline in READY (TIM-3, TIM-6)"),
        ("--session-timeout", "the endpoint's idle deadline, relationship open (TIM-4)"),
        ("--frame-timeout", "the endpoint's deadline inside a frame (TIM-5)"),
    )
    for flag, what in deadlines:
        conform.add_argument(flag, type=float, metavar="SECONDS", help=what)
    conform.add_argument(
        "--max-per-address",
        type=int,
        metavar="N",
        help="the endpoint's bound on connections from one address (TIM-10, TIM-12)",
    )
    conform.add_argument("--only", help="requirement ids or prefixes, comma-separated (NEG,SES-4)")
    conform.add_argument("--timeout", type=float, default=10.0, help="seconds per answer")
    conform.add_argument("--json", action="store_true", help="the report as JSON")
    conform.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    conform.add_argument("--verbose", action="store_true", help="list n/a requirements too")
    conform.add_argument("--list", action="store_true", help="list the requirements and exit")
    conform.add_argument(
        "--export-spec",
        metavar="DIR",
        help="write the protocol specification and its golden vectors to DIR, and exit",
    )
    conform.set_defaults(func=_cmd_conform)

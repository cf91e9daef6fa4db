"""``frctl``: the project's command line.

Each subcommand is a thin shell over a library call. Data goes to stdout, diagnostics to
stderr; exit codes: 0 ok, 1 failure, 2 usage error (argparse), 3 not in sync / unhealthy,
4 not found, 130 interrupted. Every expected failure is said in one line by the one
handler of :mod:`frctl.errors`; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import frproto

from .cluster_commands import register as register_cluster_commands
from .config_commands import register as register_config_commands
from .conform_commands import register as register_conform_commands
from .failover_commands import register as register_failover_commands
from .node_commands import register as register_node_commands
from .oob_commands import register as register_oob_commands
from .plan_commands import register as register_plan_commands
from .server_commands import register as register_server_commands


def _cmd_version(args: argparse.Namespace) -> int:
    major, minor = frproto.limits.PROTOCOL_VERSION
    if args.json:
        print(json.dumps({"frproto": frproto.__version__, "protocol": f"{major}.{minor}"}))
    else:
        print(f"frproto {frproto.__version__}, protocol version {major}.{minor}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.hex == "-" else args.hex
    try:
        data = bytes.fromhex("".join(text.split()))
    except ValueError as exc:
        print(f"frctl: not hex: {exc}", file=sys.stderr)
        return 1
    try:
        message = frproto.codec.decode_frame(data)
    except frproto.RemoteProtocolError as exc:
        code = type(exc).code
        print(f"frctl: invalid frame: {type(exc).__name__} ({code.name}): {exc}", file=sys.stderr)
        return 1
    if isinstance(message, tuple):
        tag, body = message
        out = {"type": "UnknownMessage", "tag": tag, "body": body.hex()}
        print(json.dumps(out) if args.json else f"UnknownMessage(tag={tag:#06x})")
    elif args.json:
        print(json.dumps(frproto.jsonable.message_to_dict(message)))
    else:
        print(frproto.jsonable.describe(message))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(verbose=not args.quiet)


# -- frctl cert: the private CA and host certificates (frlink/certs.py) -------------------


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"days must be at least 1, not {days}")
    return days


def _cmd_cert_ca_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from frlink.certs import CertError, create_ca, describe_cert

    try:
        files = create_ca(Path(args.dir), name=args.name, days=args.days, overwrite=args.force)
        info = describe_cert(files.cert)
    except (CertError, OSError) as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {
                    "action": "ca create",
                    "key": str(files.key),
                    "cert": str(files.cert),
                    "fingerprint_sha256": info.fingerprint_sha256,
                }
            )
        )
    else:
        print(f"wrote {files.key}")
        print(f"wrote {files.cert}")
        print(f"CA fingerprint (sha256): {info.fingerprint_sha256}", file=sys.stderr)
    print(
        f"keep {files.key} secret and backed up: losing it means re-issuing every host "
        "certificate; copy only ca.pem to hosts",
        file=sys.stderr,
    )
    return 0


def _cmd_cert_issue(args: argparse.Namespace) -> int:
    from pathlib import Path

    from frlink.certs import CA_CERT, CertError, issue_host_cert

    ca_dir, out_dir = Path(args.ca), Path(args.out)
    try:
        ca_pem = (ca_dir / CA_CERT).read_bytes()
        copy = out_dir / CA_CERT
        ca_copy_existed = copy.is_file() and copy.read_bytes() == ca_pem
    except OSError:
        ca_copy_existed = False  # issue_host_cert reports the missing CA
    try:
        files = issue_host_cert(
            ca_dir,
            out_dir,
            args.name,
            extra_names=args.san or (),
            ip_addresses=args.ip or (),
            days=args.days,
            overwrite=args.force,
        )
    except (CertError, OSError) as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        wrote = [str(files.key), str(files.cert)] + ([] if ca_copy_existed else [str(files.ca)])
        print(json.dumps({"action": "cert issue", "name": args.name, "wrote": wrote}))
        return 0
    print(f"wrote {files.key}")
    print(f"wrote {files.cert}")
    if not ca_copy_existed:
        print(f"wrote {files.ca}")
    return 0


def _cmd_cert_show(args: argparse.Namespace) -> int:
    import datetime as dt
    from pathlib import Path

    from frlink.certs import CertError, describe_cert

    try:
        info = describe_cert(Path(args.file))
    except CertError as exc:
        print(f"frctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from .timefmt import rfc3339

        out = info.to_dict()
        out.update(not_before=rfc3339(info.not_before), not_after=rfc3339(info.not_after))
        print(json.dumps(out))
        return 0
    now = dt.datetime.now(dt.UTC)
    if now > info.not_after:
        state = "EXPIRED"
    elif now < info.not_before:
        state = "NOT YET VALID"
    else:
        state = f"valid, {(info.not_after - now).days} days left"
    rows = [
        ("subject CN", info.subject_cn or "-"),
        ("issuer CN", info.issuer_cn or "-"),
        ("DNS names", ", ".join(info.dns_names) or "-"),
        ("IP addresses", ", ".join(info.ip_addresses) or "-"),
        ("not before", info.not_before.isoformat()),
        ("not after", f"{info.not_after.isoformat()} ({state})"),
        ("CA", "yes" if info.is_ca else "no"),
        ("ext key usage", ", ".join(info.ext_key_usages) or "-"),
        ("serial", f"{info.serial:x}"),
        ("sha256", info.fingerprint_sha256),
    ]
    for label, value in rows:
        print(f"{label + ':':<14} {value}")
    return 0


def _add_cert_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cert = sub.add_parser("cert", help="create the CA, issue and inspect host certificates")
    csub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")

    ca = csub.add_parser("ca", help="the private certificate authority")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    create = ca_sub.add_parser("create", help="create ca.pem and ca-key.pem in DIR")
    create.add_argument("--dir", required=True, help="directory for ca.pem and ca-key.pem")
    create.add_argument("--name", default="frrep CA", help="the CA's common name")
    create.add_argument("--days", type=_positive_days, default=3650, help="validity (3650)")
    create.add_argument("--force", action="store_true", help="overwrite existing files")
    create.add_argument("--json", action="store_true", help="one JSON object: what was written")
    create.set_defaults(func=_cmd_cert_ca_create)

    issue = csub.add_parser(
        "issue", help="issue NAME.pem and NAME-key.pem (EKU server+client) signed by the CA"
    )
    issue.add_argument("name", metavar="NAME", help="the host's DNS name (first SAN, CN)")
    issue.add_argument("--ca", required=True, help="directory holding ca.pem and ca-key.pem")
    issue.add_argument("--out", required=True, help="directory for the host's files")
    issue.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="extra DNS name, e.g. the broker's CAP name (repeatable)",
    )
    issue.add_argument("--ip", action="append", metavar="ADDR", help="IP address SAN (repeatable)")
    issue.add_argument("--days", type=_positive_days, default=825, help="validity (825)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.add_argument("--json", action="store_true", help="one JSON object: what was written")
    issue.set_defaults(func=_cmd_cert_issue)

    show = csub.add_parser("show", help="describe a certificate file")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_cmd_cert_show)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="frctl",
        description="Replication of virtual machines to a recovery cluster.",
    )
    major, minor = frproto.limits.PROTOCOL_VERSION
    parser.add_argument(
        "--version",
        action="version",
        version=f"frctl {_package_version()} (protocol {major}.{minor})",
        help="print the version",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of any error (for a bug report)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    version = sub.add_parser("version", help="print library and protocol versions")
    version.add_argument("--json", action="store_true", help="machine-readable output")
    version.set_defaults(func=_cmd_version)

    demo = sub.add_parser("demo", help="run the loopback demo")
    demo.add_argument("--quiet", action="store_true", help="print only the summary")
    demo.set_defaults(func=_cmd_demo)

    protocol = sub.add_parser("protocol", help="protocol tools")
    psub = protocol.add_subparsers(dest="protocol_command", required=True, metavar="ACTION")
    decode = psub.add_parser("decode", help="decode one frame given in hex ('-' reads stdin)")
    decode.add_argument("hex")
    decode.add_argument("--json", action="store_true", help="print the message as JSON")
    decode.set_defaults(func=_cmd_decode)

    _add_cert_parser(sub)
    register_server_commands(sub)
    register_node_commands(sub)
    register_oob_commands(sub)
    register_cluster_commands(sub)
    register_failover_commands(sub)
    register_plan_commands(sub)
    register_conform_commands(sub)
    register_config_commands(sub)
    return parser


def _package_version() -> str:
    """The installed distribution's version (the source tree's frproto version when run
    from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("frrep")
    except PackageNotFoundError:
        return frproto.__version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run frctl with ``argv`` (default: the process arguments); returns the exit code.

    No expected failure ends in a traceback: :func:`frctl.errors.report` says it in one
    line with its exit code (``--debug`` shows the traceback too)."""
    from .errors import report

    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SystemExit:
        raise
    except BaseException as exc:  # the one place every failure is said
        return report(exc, debug=args.debug)
    return result


if __name__ == "__main__":
    sys.exit(main())

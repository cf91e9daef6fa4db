"""``frctl``: the project's command line.

Each subcommand is a thin shell over a library call. Data goes to stdout, diagnostics to
stderr; exit codes: 0 ok, 1 failure, 2 usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import frproto


def _cmd_version(args: argparse.Namespace) -> int:
    major, minor = frproto.PROTOCOL_VERSION
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
        message = frproto.decode_frame(data)
    except frproto.RemoteProtocolError as exc:
        code = type(exc).code
        print(f"frctl: invalid frame: {type(exc).__name__} ({code.name}): {exc}", file=sys.stderr)
        return 1
    if isinstance(message, tuple):
        tag, body = message
        out = {"type": "UnknownMessage", "tag": tag, "body": body.hex()}
        print(json.dumps(out) if args.json else f"UnknownMessage(tag={tag:#06x})")
    elif args.json:
        print(json.dumps(frproto.message_to_dict(message)))
    else:
        print(frproto.describe(message))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(verbose=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="frctl",
        description="Replication of virtual machines to a recovery cluster.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run frctl with ``argv`` (default: the process arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())

"""The `sd-operator` command: one CLI whose subcommands are the operator, the services and the tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sd_operator import API_GROUP, API_VERSION, __version__, crds, logs, run
from sd_operator.batch import cli as batch_cli
from sd_operator.emulator import cli as emulator_cli
from sd_operator.fetch import fetcher
from sd_operator.gateway import server as gateway_server
from sd_operator.training import dataset, publish, train

Command = Callable[[argparse.Namespace], int]


def _version(_: argparse.Namespace) -> int:
    print(f"sd-operator {__version__} (API {API_GROUP}/{API_VERSION})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sd-operator {__version__}")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=logs.format_of(),
        help="plain lines, or one JSON object per line for a log pipeline (default: $SD_LOG_FORMAT or plain)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("version", help="print the version and the API group/version")
    p.set_defaults(func=_version)
    crds.add_parser(sub)
    run.add_parser(sub)
    fetcher.add_parser(sub)
    gateway_server.add_parser(sub)
    emulator_cli.add_parser(sub)
    publish.add_parser(sub)
    dataset.add_parser(sub)
    train.add_parser(sub)
    batch_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_format not in logs.FORMATS:  # a bad SD_LOG_FORMAT (argparse checks only the flag)
        raise SystemExit(f"sd-operator: SD_LOG_FORMAT must be one of {', '.join(logs.FORMATS)}")
    logs.setup(args.log_format)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())

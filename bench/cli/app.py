"""The command line: ``robustmatrix run | list | leaderboard | fit | submit | verify | sweep |
publish``, one module per command in this package (each has ``add_parser`` and ``run``).

Every expected failure ends with ONE line and exit status 2 (:mod:`bench.cli.errors`).
"""

from __future__ import annotations

import argparse
import sys

from bench.cli import fit, leaderboard, listing, publish, run, submit, sweep, verify
from bench.cli.errors import run_command
from bench.cli.run import EXAMPLES

#: the commands in ``--help`` order
COMMANDS = {"run": run, "list": listing, "leaderboard": leaderboard, "fit": fit,
            "submit": submit, "verify": verify, "sweep": sweep, "publish": publish}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line too (exit status 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        from bench.core.config import one_line

        self.exit(2, f"robustmatrix: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="robustmatrix", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adversarial robustness benchmark: every defense against every attack, with "
                    "adaptive attacks, reliability flags and a resumable result store.",
        epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    return run_command(COMMANDS[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())

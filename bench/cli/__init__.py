"""The command line, the top floor: ``robustmatrix`` / ``python -m bench``."""

from bench.cli.app import build_parser, main

__all__ = ["build_parser", "main"]

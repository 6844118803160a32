"""``robustmatrix list [WHAT]``: the registered defenses, attacks, datasets, models, presets."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    ls = sub.add_parser("list", help="list registered defenses, attacks, datasets, models, presets")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "defenses", "attacks", "datasets", "models", "presets"])
    ls.add_argument("--pattern", default="*", help="fnmatch pattern, e.g. 'pgd*'")
    ls.add_argument("--tests", action="store_true", help="include the tiny test_* entries")


def run(args: argparse.Namespace) -> int:
    from bench.core.config import list_presets
    from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    regs = {"defenses": DEFENSES, "attacks": ATTACKS, "datasets": DATASETS, "models": MODELS}
    kinds = list(regs) + ["presets"] if args.what == "all" else [args.what]
    for kind in kinds:
        if kind == "presets":
            names = list_presets()
            docs = {n: "" for n in names}
        else:
            reg = regs[kind]
            names = reg.list(args.pattern, include_test=args.tests)
            docs = {n: _first_line(reg.get(n).__doc__) for n in names}
        print(f"{kind}:")
        for n in names:
            print(f"  {n:28s} {docs[n]}")
    return 0


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""

"""``robustmatrix publish``: render entries as Markdown, CSV, JSON, LaTeX and a static HTML
leaderboard (:func:`leaderboard.formats.publish`)."""

from __future__ import annotations

from typing import Any

from bench.cli.errors import info
from leaderboard.formats import parse_formats, publish


def add_parser(sub: Any) -> None:
    p = sub.add_parser("publish", help="render entries as Markdown, CSV, JSON, LaTeX and a static "
                       "HTML leaderboard (with plots)")
    p.add_argument("--entries", action="append", required=True,
                   help="folder (searched recursively) or file of entries (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", default="md,csv,json,latex,html",
                   help="comma-separated subset of md,csv,json,latex,html [all]")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--show-cost", action="store_true", help="add pass counts and wall time")
    p.add_argument("--worst-case-only", action="store_true", help="hide per-attack columns")


def run(args: Any) -> int:
    from leaderboard.entries import load_entries

    formats = parse_formats(args.format)
    entries = load_entries(*args.entries)
    paths = publish(entries, args.out, formats=formats, plots=not args.no_plots,
                    per_attack=not args.worst_case_only, show_cost=args.show_cost)
    if "md" in paths:
        print(paths["md"].read_text())
    info(f"{len(entries)} entries published to {args.out}: "
         + ", ".join(str(p) for k, p in paths.items() if ":" not in k))
    return 0

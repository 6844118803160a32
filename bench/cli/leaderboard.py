"""``robustmatrix leaderboard``: print and write the leaderboard of a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bench.cli.errors import info


def add_parser(sub: Any) -> None:
    lb = sub.add_parser("leaderboard", help="print and write the leaderboard of a run")
    lb.add_argument("--run-dir", default="runs/quick", help="the run directory [runs/quick]")
    lb.add_argument("--out", help="where to write the tables [<run-dir>/leaderboard]")
    lb.add_argument("--worst-case-only", action="store_true", help="hide per-attack columns")
    lb.add_argument("--show-cost", action="store_true", help="add pass counts and wall time")
    lb.add_argument("--short-flags", action="store_true",
                    help="print flag codes only (the files keep what was seen and what to try)")
    lb.add_argument("--checklist", action="store_true",
                    help="also print each row's evaluation checklist (docs/checklist.md) and "
                         "write it to <out>/checklist.md")
    lb.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                    help="a paired comparison of two rows on the same images: A - B with a "
                         "95%% interval and McNemar's p, per board; written to "
                         "<out>/compare.md (repeatable)")


def run(args: argparse.Namespace) -> int:
    import errno

    from bench.core.config import check_run_dir
    from bench.core.store import ResultStore
    from leaderboard.formats import to_markdown, write_all
    from leaderboard.table import build_records, build_tables

    store = ResultStore(Path(args.run_dir) / "results.sqlite", readonly=True)
    records = build_records(store)
    compared = []
    if args.compare:  # before anything is printed or written: a bad label is one line
        from leaderboard.compare import compare_records

        compared = [compare_records(store, a, b) for a, b in args.compare]
    tables = build_tables(store, per_attack=not args.worst_case_only, show_cost=args.show_cost,
                          flag_detail=not args.short_flags, records=records)
    if not tables:
        info(f"no finished cells in {args.run_dir} yet")
        return 0
    print(to_markdown(tables))
    if args.out:
        check_run_dir(args.out, "--out")
    out = Path(args.out) if args.out else Path(args.run_dir) / "leaderboard"
    try:
        write_all(store, out, per_attack=not args.worst_case_only, show_cost=args.show_cost,
                  records=records)
    except OSError as exc:  # a read-only run directory: the tables above are the result
        if args.out or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        info(f"the run directory {args.run_dir} is read-only, so the tables were printed above "
             "and not written; pass --out FOLDER to write them elsewhere")
        return 0
    if args.checklist:
        from leaderboard.checklist import checklist_table, legend
        from leaderboard.entries import board_title, store_checklists

        boards: dict[tuple, list] = {}
        for row in store_checklists(store):
            boards.setdefault((row["dataset"], row["threat"], row["eps"]), []).append(row)
        text = "\n\n".join(f"### {board_title(*k)}\n\n" + checklist_table(
            [(r["defense"], r["checklist"]) for r in rows]) for k, rows in boards.items())
        text += "\n\n" + legend() + "\n"
        print(text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checklist.md").write_text(text)
    if compared:
        from leaderboard.compare import to_markdown as compare_markdown

        text = "\n\n".join(compare_markdown(c) for c in compared) + "\n"
        print("\n" + text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
    info(f"tables written to {out}")
    return 0

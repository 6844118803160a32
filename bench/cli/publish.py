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
    p.add_argument("--unverified", action="store_true", help="also publish entries that fail "
                   "their integrity check (hand-edited), marked UNVERIFIED on the page")
    p.add_argument("--worst-case-only", action="store_true", help="hide per-attack columns")


def run(args: Any) -> int:
    from bench.core.config import check_run_dir
    from leaderboard.entries import EntryError, consistent_accuracy, entry_digest, load_entries

    check_run_dir(args.out, "--out")
    formats = parse_formats(args.format)
    entries = load_entries(*args.entries)
    for e in entries:  # an entry is untrusted: the same integrity check as `verify`
        accs = [e["clean"], e["worst_case"], *e["attacks"].values()]
        intact = (all(consistent_accuracy(a) for a in accs)
                  and entry_digest(e) == e["provenance"].get("entry_sha256"))
        if intact:
            continue
        if not args.unverified:
            raise EntryError(f"entry {e.get('_path', e.get('entry_id'))} fails its integrity "
                             "check (hand-edited numbers or digest); re-submit it, or publish it "
                             "marked as such with --unverified")
        e["_unverified"] = True
        e["defense"] = {**e["defense"], "label": f"{e['defense']['label']} (UNVERIFIED)"}
    paths = publish(entries, args.out, formats=formats, plots=not args.no_plots,
                    per_attack=not args.worst_case_only, show_cost=args.show_cost)
    if "md" in paths:
        print(paths["md"].read_text())
    info(f"{len(entries)} entries published to {args.out}: "
         + ", ".join(str(p) for k, p in paths.items() if ":" not in k))
    return 0

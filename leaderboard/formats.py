"""Published formats rendered from the leaderboard tables and records."""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from bench.store import ResultStore
from leaderboard.table import build_records, build_tables


def to_markdown(tables: dict) -> str:
    parts = []
    for title, df in tables.items():
        parts.append(f"### {title}\n\n" + tabulate(df, headers="keys", tablefmt="github",
                                                     showindex=False, disable_numparse=True))
    parts.append("Accuracies in %, with 95% Wilson intervals in brackets; the worst case is the "
                 "per-sample AND over all attacks; '=' ranks are tied (overlapping intervals).")
    return "\n\n".join(parts) + "\n"


def write_all(store: ResultStore, out_dir: Path, *, per_attack: bool = True,
              show_cost: bool = False) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(store, per_attack=per_attack, show_cost=show_cost)
    paths = {"markdown": out_dir / "leaderboard.md", "json": out_dir / "leaderboard.json"}
    paths["markdown"].write_text(to_markdown(tables))
    paths["json"].write_text(json.dumps(build_records(store), indent=2, default=str))
    for title, df in tables.items():
        slug = "".join(ch if ch.isalnum() else "_" for ch in title).strip("_")
        p = out_dir / f"leaderboard_{slug}.csv"
        df.to_csv(p, index=False)
        paths[f"csv:{title}"] = p
    return paths

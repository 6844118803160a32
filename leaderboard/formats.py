"""Published formats rendered from the leaderboard tables and records.

From a run's store (``robustmatrix run`` / ``leaderboard``): :func:`write_all` (Markdown, CSV,
JSON). From submitted entries (``robustmatrix publish``, :func:`publish`): Markdown (tabulate),
CSV (per board for reading, one long numeric file for analysis), JSON, LaTeX (booktabs, for
papers) and the static HTML leaderboard (:mod:`leaderboard.html`), with the figures of
:mod:`leaderboard.plots`. Numbers stay numbers until here.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench.core.store import ResultStore
from leaderboard.escape import md_escape, safe_url
from leaderboard.table import build_records, build_tables

FORMATS = ("md", "csv", "json", "latex", "html")
NOTE = ("Accuracies in %, with 95% Wilson intervals in brackets; the worst case is the "
        "per-sample AND over all attacks; '=' ranks are tied (overlapping intervals).")


def to_markdown(tables: dict) -> str:
    parts = []
    for title, df in tables.items():
        parts.append(f"### {title}\n\n" + tabulate(df, headers="keys", tablefmt="github",
                                                     showindex=False, disable_numparse=True))
    parts.append(NOTE)
    return "\n\n".join(parts) + "\n"


def write_all(store: ResultStore, out_dir: Path, *, per_attack: bool = True,
              show_cost: bool = False, keys=None, records=None) -> dict[str, Path]:
    """Markdown, JSON and CSV tables of ``store`` (its cells ``keys``, or its current cells),
    from ``records`` when the caller already built them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else build_records(store, keys)
    tables = build_tables(store, per_attack=per_attack, show_cost=show_cost, records=records)
    paths = {"markdown": out_dir / "leaderboard.md", "json": out_dir / "leaderboard.json"}
    paths["markdown"].write_text(to_markdown(tables))
    paths["json"].write_text(json.dumps(records, indent=2, default=str))
    for title, df in tables.items():
        p = out_dir / f"leaderboard_{_file_slug(title)}.csv"
        df.to_csv(p, index=False)
        paths[f"csv:{title}"] = p
    return paths


def _file_slug(title: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in title).strip("_")


# entries: Markdown ---------------------------------------------------------------------------
def flag_notes(entries: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(defense, code, what was seen, what to try) for every flag, in entry order."""
    out = []
    for e in entries:
        for f in e["flags"]:
            out.append((e["defense"]["label"], f"{f['code']} ({f.get('title', '')})",
                        f.get("seen", ""), f.get("try", "")))
    return out


def entries_markdown(entries: list[dict[str, Any]], *, per_attack: bool = True,
                     show_cost: bool = False) -> str:
    """The Markdown leaderboard of submitted entries: one table per board, its flags explained
    (what was seen, what to try), and where each number comes from."""
    from leaderboard.entries import board_title, entries_tables, group_boards

    tables = entries_tables(entries, per_attack=per_attack, show_cost=show_cost)
    parts = []
    for key, es in group_boards(entries).items():
        title = board_title(*key)
        head = html.escape(title, quote=False)
        parts.append(f"### {head}\n\n" + tabulate(tables[title].map(md_escape), headers="keys",
                                                     tablefmt="github", showindex=False,
                                                     disable_numparse=True))
        if any(e.get("checklist") for e in es):
            from leaderboard.checklist import legend

            parts.append(legend())
        notes = flag_notes(es)
        if notes:
            parts.append("Flags:\n\n" + "\n".join(
                f"- **{md_escape(d)}**: `{str(c).replace('`', '')}`: {md_escape(seen)}. "
                f"Try: {md_escape(t)}."
                for d, c, seen, t in notes))
        parts.append("Entries:\n\n" + "\n".join(_md_source(e) for e in es))
    parts.append(NOTE)
    return "\n\n".join(parts) + "\n"


def _md_source(e: dict[str, Any]) -> str:
    d, p = e["defense"], e["provenance"]
    bits = [f"**{md_escape(d['label'])}**"]
    if d.get("authors"):
        bits.append(md_escape(d["authors"]))
    if safe_url(d.get("paper")):
        bits.append(f"[paper]({safe_url(d['paper'])})")
    bits.append(f"n={e['n']}, seed {p.get('seed')}, code {p.get('code_version')}, "
                f"weights sha256 {str(p.get('checkpoint_sha256'))[:12]}")
    return "- " + "; ".join(bits)


# entries: CSV and JSON -----------------------------------------------------------------------
def entries_frame(entries: list[dict[str, Any]]):
    """One row per entry, numbers as numbers (fractions), for analysis."""
    import pandas as pd

    rows = []
    for e in entries:
        d = e["defense"]
        row: dict[str, Any] = {"dataset": e["dataset"], "threat": e["threat"], "eps": e["eps"],
                               "defense": d["label"], "authors": d.get("authors", ""),
                               "paper": d.get("paper", ""),
                               "architecture": d.get("architecture", ""),
                               "extra_data": bool(d.get("extra_data")), "n": e["n"]}
        for key in ("clean", "worst_case"):
            for f in ("accuracy", "ci_low", "ci_high"):
                row[f"{key}_{f}"] = e[key][f]
        for a, acc in e["attacks"].items():
            row[f"attack:{a}"] = acc["accuracy"]
        row["flags"] = " ".join(dict.fromkeys(f["code"] for f in e["flags"]))
        row["forward_passes"] = e["cost"].get("forward_passes")
        row["backward_passes"] = e["cost"].get("backward_passes")
        row["wall_time_s"] = e["cost"].get("total_wall_time", e["cost"].get("attack_wall_time"))
        row["code_version"] = e["provenance"].get("code_version")
        row["checkpoint_sha256"] = e["provenance"].get("checkpoint_sha256")
        row["entry_sha256"] = e["provenance"].get("entry_sha256")
        rows.append(row)
    return pd.DataFrame(rows)


def entries_json(entries: list[dict[str, Any]]) -> str:
    from leaderboard.entries import board_title, group_boards
    from leaderboard.table import rank

    boards = []
    for key, es in group_boards(entries).items():
        boards.append({"title": board_title(*key), "dataset": key[0], "threat": key[1],
                       "eps": es[0]["eps"],
                       "rows": [{"rank": r, **{k: v for k, v in e.items() if not k.startswith("_")}}
                                for r, e in zip(rank(es), es)]})
    return json.dumps({"schema": "robustmatrix-leaderboard-1", "boards": boards}, indent=2,
                      default=str, allow_nan=False) + "\n"


# entries: LaTeX ------------------------------------------------------------------------------
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: Any) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def _latex_cell(text: Any) -> str:
    """``40.0 [22, 61]`` -> ``40.0 {\\scriptsize [22, 61]}``; other text escaped."""
    s = str(text)
    if "[" in s and s.endswith("]"):
        head, _, ci = s.partition(" [")
        return f"{latex_escape(head)} {{\\scriptsize [{latex_escape(ci[:-1])}]}}"
    return latex_escape(s)


def latex_title(title: str) -> str:
    r"""``cifar10 | Linf eps=8/255`` -> ``cifar10, $\ell_\infty$, $\epsilon = 8/255$``."""

    m = re.fullmatch(r"(.*) \| (Linf|L2|NONE) eps=(\S+)", title)
    if not m:
        return latex_escape(title)
    norm = {"Linf": r"$\ell_\infty$", "L2": r"$\ell_2$"}.get(m.group(2), latex_escape(m.group(2)))
    return f"{latex_escape(m.group(1))}, {norm}, $\\epsilon = {latex_escape(m.group(3))}$"


def to_latex(tables: dict, *, label_prefix: str = "tab:robustmatrix") -> str:
    """booktabs tables (one ``table`` float per board) for ``\\usepackage{booktabs}``."""
    parts = ["% Generated by robustmatrix publish; needs \\usepackage{booktabs}."]
    for title, df in tables.items():
        cols = list(df.columns)
        align = "".join("r" if c == "Rank" or c.endswith("%") or c in (
            "Fwd passes", "Bwd passes", "Wall s") else "l" for c in cols)
        lines = [r"\begin{table}[t]", r"\centering", r"\small",
                 f"\\caption{{{latex_title(title)}. {latex_escape(NOTE)}}}",
                 f"\\label{{{label_prefix}:{_file_slug(title).lower()}}}",
                 f"\\begin{{tabular}}{{{align}}}", r"\toprule",
                 " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
        for _, row in df.iterrows():
            lines.append(" & ".join(_latex_cell(row[c]) for c in cols) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# publishing ----------------------------------------------------------------------------------
def parse_formats(text: str) -> list[str]:
    from leaderboard.entries import EntryError

    wanted = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    aliases = {"markdown": "md", "tex": "latex"}
    wanted = [aliases.get(f, f) for f in wanted]
    bad = [f for f in wanted if f not in FORMATS]
    if bad or not wanted:
        raise EntryError(f"--format {text!r}: unknown format {bad[0] if bad else '(empty)'}; "
                         f"choose from {','.join(FORMATS)}")
    return list(dict.fromkeys(wanted))


def publish(entries: list[dict[str, Any]], out_dir: str | Path, *,
            formats: list[str] | tuple[str, ...] = FORMATS, plots: bool = True,
            per_attack: bool = True, show_cost: bool = False) -> dict[str, Path]:
    """Write the requested formats (and, with ``plots``, PNG+SVG figures in ``plots/``)."""
    from leaderboard.entries import EntryError, entries_tables

    if not entries:
        raise EntryError("no entries to publish; submit a defense first (`robustmatrix submit`)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    tables = entries_tables(entries, per_attack=per_attack, show_cost=show_cost)
    if "md" in formats:
        paths["md"] = out / "leaderboard.md"
        paths["md"].write_text(entries_markdown(entries, per_attack=per_attack,
                                                show_cost=show_cost))
    if "csv" in formats:
        paths["csv"] = out / "entries.csv"
        entries_frame(entries).to_csv(paths["csv"], index=False)
        for title, df in tables.items():
            p = out / f"leaderboard_{_file_slug(title)}.csv"
            df.to_csv(p, index=False)
            paths[f"csv:{title}"] = p
    if "json" in formats:
        paths["json"] = out / "leaderboard.json"
        paths["json"].write_text(entries_json(entries))
    if "latex" in formats:
        paths["latex"] = out / "leaderboard.tex"
        paths["latex"].write_text(to_latex(tables))
    figures = None
    if plots:
        from leaderboard.plots import make_plots

        figures = make_plots(entries, out / "plots")
        paths["plots"] = out / "plots"
    if "html" in formats:
        from leaderboard.html import write_site

        paths["html"] = write_site(entries, out / "html", figures=figures,
                                   per_attack=per_attack, show_cost=show_cost)
    return paths

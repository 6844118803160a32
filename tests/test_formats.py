"""Published formats rendered from entries: golden files for Markdown and LaTeX, and the
CSV / JSON / plots / publish command on the deterministic sample entries.

Regenerate the golden files after an intended change with
``ROBUSTMATRIX_UPDATE_GOLDEN=1 python -m pytest tests/test_formats.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from leaderboard.entries import (
    EntryError,
    entries_tables,
    entry_digest,
    load_entries,
    sample_entries,
    write_entry,
)
from leaderboard.formats import (
    entries_frame,
    entries_json,
    entries_markdown,
    latex_escape,
    to_latex,
    to_markdown,
)

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ROBUSTMATRIX_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; set ROBUSTMATRIX_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file"


def test_markdown_golden():
    check_golden("leaderboard.md", entries_markdown(sample_entries()))


def test_latex_golden():
    check_golden("leaderboard.tex", to_latex(entries_tables(sample_entries())))


def test_latex_is_booktabs_and_escaped():
    tex = to_latex(entries_tables(sample_entries()))
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 2 and r"\midrule" in tex
    assert r"\hline" not in tex
    assert r"Undefended\_100\%" in tex and r"B. Author \& C. Author" not in tex  # not a column
    assert r"$\ell_\infty$, $\epsilon = 8/255$" in tex
    assert latex_escape("a_b&c%d$e#f{g}h~i^j\\") == (
        r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}")


def test_markdown_ranks_ties_and_explains_flags():
    md = entries_markdown(sample_entries())
    rows = [line for line in md.splitlines() if line.startswith("| ") and "Linf" not in line]
    linf = md.split("### test_tiny | Linf eps=8/255")[1]
    order = [n for n in ("Adv. trained CNN", "Bit-depth CNN", "Undefended_100%")]
    assert [linf.index(n) for n in order] == sorted(linf.index(n) for n in order)
    assert "| =1 " in linf  # overlapping intervals share a rank
    assert "zero_gradients" in linf and "Try: use BPDA" in linf
    assert rows


def test_to_markdown_still_renders_store_tables():
    df = pd.DataFrame([{"Rank": 1, "Defense": "x", "Worst case %": "1.0 [0, 5]"}])
    assert "| x " in to_markdown({"t": df}) and to_markdown({"t": df}).startswith("### t")


def test_csv_and_json_keep_numbers():
    es = sample_entries()
    df = entries_frame(es)
    assert len(df) == 4 and df["worst_case_accuracy"].dtype.kind == "f"
    assert set(df.columns) >= {"clean_ci_low", "worst_case_ci_high", "attack:pgd", "flags",
                               "checkpoint_sha256", "paper", "extra_data"}
    boards = json.loads(entries_json(es))["boards"]
    assert [b["title"] for b in boards] == ["test_tiny | L2 eps=0.5",
                                            "test_tiny | Linf eps=8/255"]
    assert boards[1]["rows"][1]["rank"] == "=1"
    assert isinstance(boards[1]["rows"][0]["worst_case"]["accuracy"], float)


def test_entries_roundtrip_and_bad_files(tmp_path):
    es = sample_entries()
    for e in es:
        write_entry(e, tmp_path / "entries")
    (tmp_path / "entries" / "config.json").write_text("{}")  # not an entry: skipped
    loaded = load_entries(tmp_path)
    assert [e["entry_id"] for e in loaded] == sorted(e["entry_id"] for e in es)
    assert all(entry_digest(e) == e["provenance"]["entry_sha256"] for e in loaded)
    (tmp_path / "entries" / "broken.json").write_text("{not json")
    with pytest.raises(EntryError, match="broken.json is not valid JSON"):
        load_entries(tmp_path)
    with pytest.raises(EntryError, match="no entries folder"):
        load_entries(tmp_path / "missing")


def test_publish_writes_every_format_and_plots(tmp_path, capsys):
    from bench.cli import main

    for e in sample_entries():
        write_entry(e, tmp_path / "entries")
    out = tmp_path / "site"
    assert main(["publish", "--entries", str(tmp_path / "entries"), "--out", str(out)]) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"leaderboard.md", "leaderboard.tex", "leaderboard.json", "entries.csv",
            "html/index.html", "html/test_tiny_linf.html", "html/test_tiny_l2.html"} <= names
    for kind in ("clean_vs_robust", "sweep"):
        assert any(kind in n and n.endswith(".png") for n in names), kind
        assert any(kind in n and n.endswith(".svg") for n in names), kind
    assert "| =1 " in capsys.readouterr().out
    assert main(["publish", "--entries", str(tmp_path / "entries"), "--out", str(out),
                 "--format", "md,pdf"]) == 2
    assert "unknown format pdf" in capsys.readouterr().err


def test_svg_plots_are_reproducible(tmp_path):
    from leaderboard.plots import make_plots

    es = sample_entries()
    a = make_plots(es, tmp_path / "a")
    b = make_plots(es, tmp_path / "b")
    key = next(iter(a["pages"]))
    assert (a["pages"][key]["sweep"]["svg"].read_bytes()
            == b["pages"][key]["sweep"]["svg"].read_bytes())

"""The static HTML leaderboard: Jinja2 templates in ``leaderboard/templates``.

One page per (dataset, threat model) with one sortable table per epsilon, an index page, no
server and no external resource (no CDN: styles, the sorting script and every figure are
inline, figures as data URIs). Each row expands into details: the defense's metadata, every
attack with its interval and cell, the contract checks, the provenance (code version, weights
sha256, config hash, seed, device, date, sample ids, adversarial tensor hashes) and plots.
Flags are shown in the row (hover for what was seen and what to try) and explained in full
under the table.

Sorting: click a column header (again to reverse). A page opened as ``board.html#sort=KEY:asc``
(or ``:desc``) starts sorted, which also makes the page testable with ``chromium --dump-dom``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from leaderboard.entries import attack_columns, board_title, eps_slug, group_boards, slug
from leaderboard.table import _eps_label, rank

TEMPLATES = Path(__file__).parent / "templates"


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["pct"] = lambda v: "" if v is None else f"{100 * float(v):.1f}"
    env.filters["pct0"] = lambda v: "" if v is None else f"{100 * float(v):.0f}"
    env.filters["short"] = lambda v, n=12: "" if v is None else str(v)[:n]
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str)
    return env


def page_name(dataset: str, threat: str) -> str:
    return f"{slug(dataset)}_{threat}.html"


def _fig(paths: dict | None, kind: str = "svg") -> str | None:
    from leaderboard.plots import data_uri

    if not paths:
        return None
    p = paths.get(kind) or paths.get("png")
    return data_uri(p) if p else None


def _row(e: dict[str, Any], rk: Any, attacks: list[str], figures: dict | None) -> dict[str, Any]:
    from leaderboard.escape import safe_url
    from leaderboard.plots import data_uri

    fig = (figures or {}).get("entries", {}).get(e["entry_id"], {})
    flags = []
    for f in e["flags"]:
        flags.append({**f, "tooltip": f"{f.get('title', f['code'])}: {f.get('seen', '')}. "
                                      f"Try: {f.get('try', '')}".strip()})
    prov = e["provenance"]
    tensors = [{"attack": a, "cell": v.get("cell_key"), "sha256": v.get("adv_sha256"),
                "batches": len(v.get("batches") or [])} for a, v in e["attacks"].items()]
    rank_num = int(str(rk).lstrip("="))
    return {
        "id": slug(e["entry_id"]), "rank": rk, "rank_num": rank_num, "entry": e,
        "defense": {**e["defense"], "paper": safe_url(e["defense"].get("paper"))},
        "unverified": bool(e.get("_unverified")), "clean": e["clean"], "worst": e["worst_case"],
        "attacks": [(a, e["attacks"].get(a)) for a in attacks], "flags": flags,
        "cost": e["cost"], "prov": prov, "tensors": tensors,
        "sample_ids": prov.get("sample_ids") or [],
        "validation": (e.get("validation") or {}).get("findings", []),
        "attack_plot": _fig(fig.get("attacks")),
        "security_plot": _fig(fig.get("security")),
        "security_png": _fig(fig.get("security"), "png"),
        "checklist": e.get("checklist") or [],
        "own_figures": [{"title": f["title"], "uri": data_uri(f["path"])}
                        for f in fig.get("figures", [])],
        "sweep": e.get("sweep"),
    }


def render_pages(entries: list[dict[str, Any]], *, figures: dict | None = None,
                 per_attack: bool = True, show_cost: bool = False) -> dict[str, str]:
    """File name -> HTML text for the index and every (dataset, threat) page."""
    env = _env()
    boards = group_boards(entries)
    pages: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (dataset, threat, eps), es in boards.items():
        attacks = attack_columns(es) if per_attack else []
        rows = [_row(e, rk, attacks, figures) for rk, e in zip(rank(es), es)]
        flag_legend: dict[str, dict[str, Any]] = {}
        for r in rows:
            for f in r["flags"]:
                item = flag_legend.setdefault(f["code"], {"code": f["code"],
                                                          "title": f.get("title", f["code"]),
                                                          "try": f.get("try", ""), "seen": []})
                item["seen"].append((r["defense"]["label"], f.get("seen", "")))
        pages.setdefault((dataset, threat), []).append({
            "title": board_title(dataset, threat, eps), "eps": eps,
            "eps_label": _eps_label(threat, eps), "id": f"board-{eps_slug(threat, eps)}",
            "attacks": attacks, "rows": rows, "flags": list(flag_legend.values()),
            "scatter": _fig(((figures or {}).get("boards") or {}).get((dataset, threat, eps),
                                                                       {}).get("scatter")),
        })
    nav = [{"file": page_name(d, t), "title": f"{d} | {t.upper() if t != 'linf' else 'Linf'}",
            "count": sum(len(b["rows"]) for b in bs),
            "boards": [{"title": b["title"], "id": b["id"], "count": len(b["rows"]), "leaders": [
                (r["defense"]["label"], r["worst"]) for r in b["rows"]
                if r["rank_num"] == 1]} for b in bs]}
           for (d, t), bs in pages.items()]
    out = {}
    board_tpl = env.get_template("board.html.j2")
    for (dataset, threat), bs in pages.items():
        sweep = _fig(((figures or {}).get("pages") or {}).get((dataset, threat), {}).get("sweep"))
        out[page_name(dataset, threat)] = board_tpl.render(
            dataset=dataset, threat=threat, boards=bs, nav=nav, sweep_plot=sweep,
            show_cost=show_cost, page_title=f"{dataset} | {threat}",
            current=page_name(dataset, threat))
    out["index.html"] = env.get_template("index.html.j2").render(
        nav=nav, page_title="robustmatrix leaderboard", n_entries=len(entries))
    return out


def write_site(entries: list[dict[str, Any]], out_dir: str | Path, *, figures: dict | None = None,
               per_attack: bool = True, show_cost: bool = False) -> Path:
    """Write the pages; returns the index path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_pages(entries, figures=figures, per_attack=per_attack,
                                   show_cost=show_cost).items():
        (out_dir / name).write_text(text)
    return out_dir / "index.html"

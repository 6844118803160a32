"""Leaderboard figures (matplotlib, Agg backend), each saved as PNG and SVG next to the tables:

* :func:`sweep_figure`: robust accuracy vs epsilon per defense (one attack configuration swept
  over a grid, from ``entry["sweep"]``; ``robustmatrix sweep`` fills it), with 95% bands;
* :func:`scatter_figure`: clean vs worst-case robust accuracy, one point per defense, with
  95% intervals on both axes;
* :func:`attack_figure`: one defense's accuracy under each attack (and the worst case);
* the figures a defense provides (e.g. t-SNE panels), listed in ``entry["figures"]``, are copied
  as they are.

Every figure is written without timestamps, so re-publishing the same entries gives the same
SVG bytes.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from leaderboard.entries import eps_slug, group_boards, slug

_SVG_META = {"Date": None, "Creator": "robustmatrix"}
_PNG_META = {"Software": "robustmatrix"}


def _eps_text(threat: str, eps: float) -> str:
    if threat == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.3g}"


def _pos(v: float) -> float:
    """An error-bar half-width (rounding can make it -1e-15 at 0% or 100%)."""
    return max(0.0, float(v))


def save(fig: Any, base: Path) -> dict[str, Path]:
    """``base.png`` and ``base.svg``; the figure is closed."""
    base.parent.mkdir(parents=True, exist_ok=True)
    out = {"png": base.with_suffix(".png"), "svg": base.with_suffix(".svg")}
    plt.rcParams["svg.hashsalt"] = "robustmatrix"
    fig.savefig(out["png"], dpi=110, bbox_inches="tight", metadata=_PNG_META)
    fig.savefig(out["svg"], bbox_inches="tight", metadata=_SVG_META)
    plt.close(fig)
    return out


def data_uri(path: str | Path) -> str:
    path = Path(path)
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg",
            ".jpeg": "image/jpeg", ".gif": "image/gif"}.get(path.suffix.lower(),
                                                           "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def sweep_figure(entries: list[dict[str, Any]], title: str):
    """Robust accuracy vs epsilon, one line per defense with a sweep; None if none has one."""
    swept, seen = [], set()
    for e in entries:  # one curve per (defense, attack), however many boards carry it
        if e.get("sweep") and e["sweep"].get("points"):
            key = (e["defense"]["label"], e["sweep"].get("attack"))
            if key not in seen:
                seen.add(key)
                swept.append(e)
    if not swept:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for e in swept:
        pts = e["sweep"]["points"]
        xs = [p["eps"] for p in pts]
        if e["threat"] == "linf":
            xs = [x * 255 for x in xs]
        ys = [100 * p["worst_case"]["accuracy"] for p in pts]
        lo = [100 * p["worst_case"]["ci_low"] for p in pts]
        hi = [100 * p["worst_case"]["ci_high"] for p in pts]
        line, = ax.plot(xs, ys, marker="o",
                        label=f"{e['defense']['label']} ({e['sweep']['attack']})")
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        here = e["eps"] * (255 if e["threat"] == "linf" else 1)
        ax.axvline(here, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("epsilon (x/255)" if swept[0]["threat"] == "linf" else "epsilon (L2)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def scatter_figure(entries: list[dict[str, Any]], title: str):
    """Clean vs worst-case accuracy with 95% intervals on both axes."""
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for e in entries:
        c, w = e["clean"], e["worst_case"]
        x, y = 100 * c["accuracy"], 100 * w["accuracy"]
        ax.errorbar(x, y, xerr=[[_pos(x - 100 * c["ci_low"])], [_pos(100 * c["ci_high"] - x)]],
                    yerr=[[_pos(y - 100 * w["ci_low"])], [_pos(100 * w["ci_high"] - y)]], fmt="o",
                    capsize=3, label=e["defense"]["label"])
        ax.annotate(e["defense"]["label"], (x, y), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.plot([0, 100], [0, 100], color="grey", lw=0.6, ls="--")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("worst-case robust accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def attack_figure(entry: dict[str, Any]):
    """Accuracy under each attack (bars with 95% intervals), clean and worst case included."""
    items = [("clean", entry["clean"])] + list(entry["attacks"].items()) + [
        ("worst case", entry["worst_case"])]
    fig, ax = plt.subplots(figsize=(max(3.2, 0.9 * len(items) + 1.2), 2.8))
    xs = range(len(items))
    vals = [100 * a["accuracy"] for _, a in items]
    err = [[_pos(v - 100 * a["ci_low"]) for v, (_, a) in zip(vals, items)],
           [_pos(100 * a["ci_high"] - v) for v, (_, a) in zip(vals, items)]]
    colors = ["#7f9fbf"] + ["#d9a05b"] * (len(items) - 2) + ["#b5473a"]
    ax.bar(xs, vals, yerr=err, capsize=3, color=colors)
    ax.set_xticks(list(xs), [k for k, _ in items], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.set_title(f"{entry['defense']['label']}: {entry['dataset']}, {entry['threat']} eps "
                 f"{_eps_text(entry['threat'], entry['eps'])}", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def security_points(entry: dict[str, Any], entries: list[dict[str, Any]]) -> list[tuple]:
    """(eps, accuracy, ci_low, ci_high) for one row's security-evaluation curve: eps 0 (clean),
    the row's own sweep when it has one, else the worst case of every board of the same
    defense, dataset and threat."""
    c = entry["clean"]
    pts = {0.0: (c["accuracy"], c["ci_low"], c["ci_high"])}
    if entry.get("sweep") and entry["sweep"].get("points"):
        for p in entry["sweep"]["points"]:
            w = p["worst_case"]
            pts[float(p["eps"])] = (w["accuracy"], w["ci_low"], w["ci_high"])
    for e in entries:
        if (e["defense"]["label"], e["dataset"], e["threat"]) == (
                entry["defense"]["label"], entry["dataset"], entry["threat"]):
            w = e["worst_case"]
            pts.setdefault(float(e["eps"]), (w["accuracy"], w["ci_low"], w["ci_high"]))
    return [(k, *v) for k, v in sorted(pts.items())]


def security_figure(entry: dict[str, Any], entries: list[dict[str, Any]]):
    """The row's security-evaluation curve: robust accuracy against epsilon (95% band), with
    chance marked; the curve goes as far as the epsilons that were run."""
    pts = security_points(entry, entries)
    scale = 255 if entry["threat"] == "linf" else 1
    xs = [p[0] * scale for p in pts]
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    ax.plot(xs, [100 * p[1] for p in pts], marker="o", color="#b5473a")
    ax.fill_between(xs, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.2,
                    color="#b5473a")
    k = (entry.get("defense") or {}).get("num_classes") or 10
    ax.axhline(100 / k, color="grey", lw=0.6, ls="--", label="chance")
    ax.axvline(entry["eps"] * scale, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("epsilon (x/255)" if entry["threat"] == "linf" else "epsilon (L2)", fontsize=8)
    ax.set_ylabel("robust accuracy (%)", fontsize=8)
    ax.set_ylim(-2, 102)
    ax.set_title(f"security curve: {entry['defense']['label']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return fig


def entry_figures(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The defense's own figures (e.g. t-SNE) that still exist: ``[{title, path}]``; relative
    paths are resolved against the entry file's folder.

    An entry is untrusted: a figure must resolve (symlinks followed) inside the entry file's own
    folder and BE an image (PNG, JPEG or SVG by its first bytes); anything else (``/etc/passwd``,
    ``../../secret.png``) is skipped with a warning."""
    import warnings

    out = []
    if not entry.get("_path"):
        return out
    base = Path(entry["_path"]).resolve().parent
    for f in entry.get("figures") or []:
        p = (base / str(f.get("path", ""))).resolve()
        if base not in p.parents or not p.is_file() or not _is_image(p):
            warnings.warn(f"entry {entry.get('entry_id')}: figure {f.get('path')!r} is not an "
                          "image inside the entry's folder; skipped", stacklevel=2)
            continue
        out.append({"title": f.get("title") or p.stem, "path": p})
    return out


def _is_image(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if path.suffix.lower() == ".png":
        return head.startswith(b"\x89PNG\r\n\x1a\n")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return head.startswith(b"\xff\xd8\xff")
    if path.suffix.lower() == ".svg":
        text = head.lstrip().lower()
        return text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text)
    return False


def make_plots(entries: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write every figure under ``out_dir``; returns
    ``{"boards": {(dataset, threat, eps): {"scatter": {...}}}, "pages": {(dataset, threat):
    {"sweep": {...}}}, "entries": {entry_id: {"attacks": {...}, "figures": [...]}}}``."""
    out_dir = Path(out_dir)
    res: dict[str, Any] = {"boards": {}, "pages": {}, "entries": {}}
    boards = group_boards(entries)
    pages: dict[tuple[str, str], list[dict]] = {}
    for (dataset, threat, eps), es in boards.items():
        pages.setdefault((dataset, threat), []).extend(es)
        name = f"{slug(dataset)}__{threat}__{eps_slug(threat, eps)}"
        fig = scatter_figure(es, f"{dataset}, {threat} eps {_eps_text(threat, eps)}")
        res["boards"][(dataset, threat, eps)] = {
            "scatter": save(fig, out_dir / f"{name}__clean_vs_robust")}
        for e in es:
            ename = f"{slug(e['defense']['label'])}__{name}"
            figs = {"attacks": save(attack_figure(e), out_dir / "entries" / f"{ename}__attacks"),
                    "security": save(security_figure(e, entries),
                                     out_dir / "entries" / f"{ename}__security")}
            copied = []
            for f in entry_figures(e):
                dest = out_dir / "entries" / f"{ename}__{slug(f['title'])}{f['path'].suffix}"
                shutil.copyfile(f["path"], dest)
                copied.append({"title": f["title"], "path": dest})
            figs["figures"] = copied
            res["entries"][e["entry_id"]] = figs
    for (dataset, threat), es in pages.items():
        fig = sweep_figure(es, f"{dataset}, {threat}: robust accuracy vs epsilon")
        if fig is not None:
            res["pages"][(dataset, threat)] = {
                "sweep": save(fig, out_dir / f"{slug(dataset)}__{threat}__sweep")}
    return res

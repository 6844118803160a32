"""The per-row evaluation checklist (docs/checklist.md): every automated check on a leaderboard
row as ``pass`` / ``fail`` / ``n/a`` with what it saw.

Inputs are what the store already holds: the row's flags (cell + matrix + contract flags, codes
in :data:`bench.core.schema.FLAG_DOCS`) and the check records the runner stored in each attack
cell's ``metrics["checks"]`` (:mod:`bench.harness.evidence`). Nothing here re-runs an attack.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

PASS, FAIL, NA = "pass", "fail", "n/a"

#: (key, short code for the Markdown column, title, flag codes that fail it, check-record codes)
ITEMS: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("binarization", "BIN", "Binarization test (Zimmermann et al. 2022)", (),
     ("binarization",)),
    ("silent_success", "SIL", "Indicator: silent success", ("silent_success",),
     ("silent_success",)),
    ("incomplete_optimization", "OPT", "Indicator: incomplete optimization (loss trace)",
     ("non_convergence",), ("loss_trace",)),
    ("transfer_failure", "TRF", "Indicator: transfer failure (BPDA surrogate)",
     ("surrogate_transfer_failure",), ("transfer_failure",)),
    ("unavailable_gradients", "GRD", "Indicator: unavailable gradients", (), ("gradients",)),
    ("unstable_predictions", "UNS", "Indicator: unstable predictions",
     ("unstable_predictions",), ("unstable_predictions",)),
    ("unconstrained_failure", "UNC", "Indicator: unconstrained attack failure",
     ("unbounded_attack_fails",), ("unconstrained_attack",)),
    ("more_iterations", "DBL", "Sanity: doubling the iterations changes nothing", (),
     ("doubled_iterations",)),
    ("large_eps", "BIG", "Sanity: accuracy at chance at a large epsilon",
     ("above_chance_large_eps",), ("large_eps",)),
    ("eps_monotone", "MON", "Sanity: accuracy falls with epsilon", ("non_monotone_eps",),
     ("eps_sweep",)),
    ("single_step", "FGS", "Sanity: iterative attack at least as strong as single-step",
     ("iterative_beats_single_step",), ("iterative_beats_single_step",)),
    ("gradient_free", "GFR", "Sanity: a gradient-free attack does not beat the gradient ones",
     ("gradient_free", "blackbox_beats_whitebox"), ("gradient_free",)),
    ("implausible_detector", "DET", "Detector plausibility (Tramer 2021)",
     ("implausible_detector",), ("detector_plausibility",)),
)
_CLAIMED = {c for item in ITEMS for c in item[3]} | {"zero_gradients"}  # GRD reads records
OTHER = ("other_flags", "FLG", "Other reliability flags")


def _merge(code: str, records: list[dict[str, Any]]) -> tuple[str, str]:
    """Fold several cells' records of one check: any fail fails; binarization is pooled."""
    if not records:
        return NA, "not run"
    fails = [r for r in records if r["status"] == FAIL]
    passes = [r for r in records if r["status"] == PASS]
    if code == "binarization":
        return _binarization(records)
    if fails:
        return FAIL, "; ".join(f"{r.get('attack', '')}: {r['seen']}".lstrip(": ")
                               for r in fails[:3])
    if passes:
        return PASS, "; ".join(f"{r.get('attack', '')}: {r['seen']}".lstrip(": ")
                               for r in passes[:2])
    return NA, records[0]["seen"]


def binarization_rates(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Per attack of the row: its own binarization pass rate."""
    return {str(r.get("attack")): float(r["pass_rate"]) for r in records
            if r.get("code") == "binarization" and r.get("pass_rate") is not None}


def _pool(ran: list[dict[str, Any]]) -> list[bool]:
    """Per point: whether any of ``ran`` found the known adversarial (None: no valid task)."""
    length = max(len(r["points"]) for r in ran)
    union: list[Any] = [None] * length
    for r in ran:
        for i, p in enumerate(r["points"]):
            if p is not None:
                union[i] = bool(union[i]) or bool(p)
    return [p for p in union if p is not None]


def _binarization(records: list[dict[str, Any]]) -> tuple[str, str]:
    """The row's attack SUITE passes a point when any of its attacks found the adversarial
    (the cells share the subsample and the seeded binary tasks); fail below the threshold.
    The row also fails when its white-box (gradient) attacks, pooled, fall below the threshold
    although another kind (a transfer or black-box attack) rescued the suite: the gradient
    evaluation is then too weak for this defense (masked gradients), which the test is for."""
    ran = [r for r in records if r["status"] in (PASS, FAIL) and r.get("points") is not None]
    if not ran:
        return (NA, records[0]["seen"]) if records else (NA, "not run")
    valid = _pool(ran)
    if not valid:
        return NA, "no valid binary task"
    rate = sum(valid) / len(valid)
    need = min(float(r.get("min_pass_rate", 0.9)) for r in ran)
    per = ", ".join(f"{r.get('attack', '?')} {r['pass_rate']:.0%}" for r in ran)
    seen = f"suite pass rate {rate:.0%} on {len(valid)} valid binary tasks ({per}; " \
        f"threshold {need:.0%})"
    white = [r for r in ran if r.get("kind", "white-box") == "white-box"]
    wb = _pool(white) if white else []
    if rate >= need and wb and sum(wb) / len(wb) < need:
        return FAIL, (f"white-box attacks {sum(wb) / len(wb):.0%} on {len(wb)} tasks, below "
                      f"the threshold (only other kinds found the rest); {seen}")
    return (PASS if rate >= need else FAIL, seen)


def build_checklist(flags: Iterable[Mapping[str, Any]],
                    records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One ``{check, short, title, status, seen}`` per :data:`ITEMS` entry, plus the other
    flags. ``records``: the row's check records, each with the ``attack`` label added."""
    flags, records = list(flags), [dict(r) for r in records]
    out = []
    for key, short, title, flag_codes, rec_codes in ITEMS:
        hit = [f for f in flags if f.get("code") in flag_codes]
        recs = [r for r in records if r.get("code") in rec_codes]
        if key == "binarization":
            status, seen = _binarization(recs)
        elif key == "unavailable_gradients" and any(r.get("bpda") for r in recs):
            status = PASS
            seen = next(f"{r.get('attack')}: {r['seen']}" for r in recs if r.get("bpda"))
        elif hit:
            status = FAIL
            seen = "; ".join(str(f.get("seen", "")) for f in hit[:3])
        else:
            status, seen = _merge(key, recs)
        if hit and status != FAIL:
            status, seen = FAIL, "; ".join(str(f.get("seen", "")) for f in hit[:3])
        out.append({"check": key, "short": short, "title": title, "status": status,
                    "seen": seen})
        if key == "binarization":
            out[-1]["pass_rates"] = binarization_rates(recs)
    other = [f for f in flags if f.get("code") not in _CLAIMED]
    out.append({"check": OTHER[0], "short": OTHER[1], "title": OTHER[2],
                "status": FAIL if other else PASS,
                "seen": ", ".join(dict.fromkeys(str(f.get("code")) for f in other)) or "none"})
    return out


def compact(checklist: list[Mapping[str, Any]] | None) -> str:
    """The Markdown column: ``✓11 ✗2 –1 (✗ BIN, UNS)``; ``-`` when there is no checklist."""
    if not checklist:
        return "-"
    n = {s: [c["short"] for c in checklist if c["status"] == s] for s in (PASS, FAIL, NA)}
    text = f"✓{len(n[PASS])} ✗{len(n[FAIL])} –{len(n[NA])}"
    return text + (f" (✗ {', '.join(n[FAIL])})" if n[FAIL] else "")


def legend() -> str:
    """The legend printed under a Markdown board."""
    parts = [f"{short} {title}" for _, short, title, _, _ in ITEMS] + [f"{OTHER[1]} {OTHER[2]}"]
    return ("Checklist: ✓ passed, ✗ failed, – not applicable (docs/checklist.md). "
            + "; ".join(parts) + ".")


def checklist_table(rows: list[tuple[str, list[Mapping[str, Any]]]], *, width: int = 70) -> str:
    """A Markdown table of several rows' checklists side by side: one line per check, one
    column per ``(title, checklist)``; each cell is the status mark and what it saw (cut to
    ``width`` characters; the JSON entry keeps it whole)."""
    from leaderboard.escape import md_escape as md_cell

    mark = {PASS: "✓", FAIL: "✗", NA: "–"}
    head = "| check | " + " | ".join(md_cell(t) for t, _ in rows) + " |"
    lines = [head, "|" + "---|" * (len(rows) + 1)]
    order = [(k, short, title) for k, short, title, *_ in ITEMS] + [OTHER]
    for key, short, title in order:
        cells = []
        for _, cl in rows:
            c = next((c for c in cl if c["check"] == key), None)
            if c is None:
                cells.append("")
                continue
            seen = str(c.get("seen", ""))
            seen = seen if len(seen) <= width else seen[:width - 1] + "…"
            cells.append(md_cell(f"{mark.get(c['status'], '?')} {seen}"))
        lines.append(f"| {short} {md_cell(title)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

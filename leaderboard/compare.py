"""Paired comparison of two defenses on the same images: is A's worst case really above B's?

The leaderboard ranks by overlapping Wilson intervals, which treats two rows as independent
samples. Rows of one run are evaluated on the SAME images, so the sharper question is paired:
on how many images is A robust and B not, and vice versa. For each board (dataset, threat
model, epsilon) where both defenses have a worst case, :func:`compare_table` gives

- the 2x2 counts (both robust, only A, only B, neither) over the shared sample ids;
- the difference of worst-case accuracies A - B with the 95% interval of Newcombe (1998,
  method 10: Wilson intervals of the two marginals combined with the continuity-corrected
  phi correlation; it stays inside [-1, 1] and behaves at small n and at 0 or 1);
- the exact two-sided McNemar p value (a binomial test of "only A" against "only B").

``robustmatrix leaderboard --run-dir RUN --compare A B`` prints it (and writes
``<out>/compare.md``); rows are named by their labels in the run.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from leaderboard.table import Z95, _eps_label, wilson_interval, worst_case_samples


class CompareError(ValueError):
    """A comparison that cannot be made (an unknown row, no shared images): says which and how
    to fix it."""


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             z: float = Z95) -> tuple[float, float]:
    """Newcombe's (1998) method-10 interval for p_A - p_B from paired binary outcomes."""
    n = both + only_a + only_b + neither
    if n <= 0:
        return (float("nan"), float("nan"))
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    # the continuity-corrected numerator of phi (Newcombe's method 10)
    num = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = num / math.sqrt(denom) if denom > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                           + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                           + (p2 - l2) ** 2))
    return (max(-1.0, lo), min(1.0, hi))


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p value: P(a split at least this uneven | a fair coin)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def paired_counts(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Counts, difference, interval and p value of two per-sample worst cases (bool Series
    indexed by sample id) on the ids they share."""
    shared = a.index.intersection(b.index)
    if len(shared) == 0:
        raise CompareError("the two rows share no images (different datasets, n or seed): "
                           "compare rows of one run, or runs with the same --n and seed")
    ra, rb = a.loc[shared].astype(bool), b.loc[shared].astype(bool)
    both, only_a = int((ra & rb).sum()), int((ra & ~rb).sum())
    only_b, neither = int((~ra & rb).sum()), int((~ra & ~rb).sum())
    n = len(shared)
    lo, hi = newcombe_paired_interval(both, only_a, only_b, neither)
    return {"n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": neither,
            "worst_a": (both + only_a) / n, "worst_b": (both + only_b) / n,
            "difference": (only_a - only_b) / n, "ci_low": lo, "ci_high": hi,
            "p_mcnemar": mcnemar_exact_p(only_a, only_b),
            "unshared": int(len(a.index.union(b.index)) - n)}


def compare_records(store: Any, a: str, b: str, keys: Iterable[str] | None = None
                    ) -> list[dict[str, Any]]:
    """One record per board holding both rows ``a`` and ``b`` (defense labels of the run)."""
    samples = worst_case_samples(store, keys)
    names = sorted({k[3] for k in samples})
    for label in (a, b):
        if label not in names:
            raise CompareError(f"no row named {label!r} in this run; its rows are: "
                               + ", ".join(repr(x) for x in names) + " (quote labels with "
                               "spaces: --compare '(a) srd + robust model' pgd_at)")
    if a == b:
        raise CompareError(f"--compare needs two different rows, got {a!r} twice")
    out = []
    boards = sorted({k[:3] for k in samples})
    for board in boards:
        sa, sb = samples.get((*board, a)), samples.get((*board, b))
        if sa is None or sb is None:
            continue
        out.append({"dataset": board[0], "threat": board[1], "eps": board[2],
                    "defense_a": a, "defense_b": b,
                    **paired_counts(sa, sb)})
    if not out:
        raise CompareError(f"{a!r} and {b!r} are never on the same board (dataset, threat "
                           "model, eps) in this run, so there is nothing paired to compare")
    return out


def compare_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Display rows for :func:`compare_records` (strings are made only here)."""
    rows = []
    for r in records:
        rows.append({
            "Board": f"{r['dataset']}, {_eps_label(r['threat'], r['eps'])}",
            "n": r["n"],
            "A worst %": f"{100 * r['worst_a']:.1f}", "B worst %": f"{100 * r['worst_b']:.1f}",
            "A - B (points)": f"{100 * r['difference']:+.1f} "
                              f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
            "both / only A / only B / neither":
                f"{r['both']} / {r['only_a']} / {r['only_b']} / {r['neither']}",
            "McNemar p": f"{r['p_mcnemar']:.3g}",
        })
    return pd.DataFrame(rows)


def to_markdown(records: list[dict[str, Any]]) -> str:
    a, b = records[0]["defense_a"], records[0]["defense_b"]
    return (f"A = {a}, B = {b}: worst case on the same images (per-sample AND over every "
            "attack); the difference's 95% interval is Newcombe's paired method 10, the p "
            "value the exact McNemar test.\n\n"
            + compare_table(records).to_markdown(index=False))
